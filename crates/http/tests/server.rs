//! The server over real sockets: limits, keep-alive, and one slow request
//! not holding up others.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tandem_http::{Connections, Handler, Limits, Options, Refusal, Request, Response};
use tandem_testkit::wait_until;

const TIMEOUT: Duration = Duration::from_secs(10);

/// `/echo` answers the body; `/hold` is answered only once the test
/// releases it (or after [`TIMEOUT`], with 500).
#[derive(Default)]
struct Echo {
    hold: Mutex<Hold>,
    changed: Condvar,
}

#[derive(Default)]
struct Hold {
    /// `/hold` requests inside the handler now.
    held: usize,
    released: bool,
}

impl Echo {
    /// Waits (bounded) until `n` `/hold` requests are inside the handler.
    fn wait_held(&self, n: usize) {
        let hold = self.hold.lock().unwrap();
        let (hold, timeout) = self
            .changed
            .wait_timeout_while(hold, TIMEOUT, |h| h.held < n)
            .unwrap();
        assert!(
            !timeout.timed_out(),
            "{} of {n} /hold requests reached the handler within {TIMEOUT:?}",
            hold.held
        );
    }

    fn held(&self) -> usize {
        self.hold.lock().unwrap().held
    }

    fn release(&self) {
        self.hold.lock().unwrap().released = true;
        self.changed.notify_all();
    }
}

impl Handler for Echo {
    fn handle(&self, request: Request, _peer: SocketAddr) -> Response {
        match request.path.as_str() {
            "/echo" => Response::new(200, "text/plain", request.body),
            // Answered to anyone; a request with the token marks its
            // connection authenticated (as the agent's API does).
            "/token" => {
                let answer = Response::new(200, "text/plain", "ok");
                if request.header("Authorization") == Some("Bearer secret") {
                    answer.authenticated_as("token")
                } else {
                    answer
                }
            }
            "/hold" => {
                let mut hold = self.hold.lock().unwrap();
                hold.held += 1;
                self.changed.notify_all();
                let (mut hold, timeout) = self
                    .changed
                    .wait_timeout_while(hold, TIMEOUT, |h| !h.released)
                    .unwrap();
                hold.held -= 1;
                if timeout.timed_out() {
                    return Response::new(500, "text/plain", "never released");
                }
                Response::new(200, "text/plain", "released")
            }
            _ => Response::json(404, r#"{"error":"no such endpoint"}"#),
        }
    }

    fn refused(&self, refusal: &Refusal) -> Response {
        Response::json(refusal.problem.status(), refusal.message.clone())
    }
}

struct Running {
    addr: SocketAddr,
    echo: Arc<Echo>,
    connections: Connections,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // A test that failed while holding a request lets it go.
        self.echo.release();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn start(limits: Limits) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let options = Options {
        limits,
        ..Options::new("test")
    };
    let echo = Arc::new(Echo::default());
    let connections = Connections::new();
    let thread = tandem_http::spawn_counted(
        listener,
        options,
        Arc::clone(&stop),
        Arc::clone(&echo) as Arc<dyn Handler>,
        connections.clone(),
    )
    .unwrap();
    Running {
        addr,
        echo,
        connections,
        stop,
        thread: Some(thread),
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Reads one answer with a Content-Length body; returns status and body.
fn read_answer(s: &mut TcpStream) -> (u16, String) {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "connection ended in a head");
        got.push(byte[0]);
    }
    let head = String::from_utf8(got).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}

#[test]
fn pipelined_requests_on_one_connection_are_answered_in_order() {
    let server = start(Limits::default());
    let mut s = connect(server.addr);
    s.write_all(
        b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST /echo?x HTTP/1.1\r\n\
          Content-Length: 2\r\n\r\nde\r\nGET /none HTTP/1.1\r\n\r\n",
    )
    .unwrap();
    assert_eq!(read_answer(&mut s), (200, "abc".into()));
    assert_eq!(read_answer(&mut s), (200, "de".into()));
    assert_eq!(read_answer(&mut s).0, 404);
}

#[test]
fn a_body_over_the_limit_that_is_really_sent_gets_413_not_a_reset() {
    let server = start(Limits {
        max_body: 1000,
        ..Limits::default()
    });
    for _ in 0..5 {
        let mut s = connect(server.addr);
        let body = vec![b'x'; 4 << 20];
        s.write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 4194304\r\n\r\n")
            .unwrap();
        // The server may refuse before all of it is sent.
        let _ = s.write_all(&body);
        let (status, message) = read_answer(&mut s);
        assert_eq!(status, 413, "{message}");
        assert!(message.contains("limit"), "{message}");
    }
    let mut s = connect(server.addr);
    s.write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\n\r\nok")
        .unwrap();
    assert_eq!(read_answer(&mut s), (200, "ok".into()));
}

#[test]
fn a_slow_request_does_not_hold_up_another_connection() {
    let server = start(Limits::default());
    let mut slow = connect(server.addr);
    slow.write_all(b"GET /hold HTTP/1.1\r\n\r\n").unwrap();
    // The slow request is inside its handler, and stays there until
    // released: the quick one can only be answered alongside it.
    server.echo.wait_held(1);
    let mut quick = connect(server.addr);
    quick
        .write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 1\r\n\r\nq")
        .unwrap();
    assert_eq!(read_answer(&mut quick), (200, "q".into()));
    assert_eq!(server.echo.held(), 1, "the slow request was let go early");
    server.echo.release();
    assert_eq!(read_answer(&mut slow), (200, "released".into()));
}

#[test]
fn stopping_closes_idle_connections_promptly() {
    let server = start(Limits::default());
    let mut idle = connect(server.addr);
    // The server has taken the connection up: stopping has to close it,
    // not merely stop accepting.
    wait_until(TIMEOUT, "the server to hold the idle connection", || {
        server.connections.open() == 1
    });
    let connections = server.connections.clone();
    let t = Instant::now();
    drop(server);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(connections.open(), 0, "a connection outlived the server");
    let mut byte = [0u8; 1];
    assert_eq!(
        idle.read(&mut byte).unwrap(),
        0,
        "the idle connection was not closed"
    );
}

fn token_request(s: &mut TcpStream) -> (u16, String) {
    s.write_all(b"GET /token HTTP/1.1\r\nAuthorization: Bearer secret\r\n\r\n")
        .unwrap();
    read_answer(s)
}

#[test]
fn idle_strangers_cannot_lock_out_a_client_with_the_token() {
    let server = start(Limits {
        max_unauthenticated: 8,
        max_connections: 32,
        ..Limits::default()
    });
    let mut known = connect(server.addr);
    assert_eq!(token_request(&mut known).0, 200);
    // 100 idle connections that never send a byte.
    let idle: Vec<TcpStream> = (0..100).map(|_| connect(server.addr)).collect();
    wait_until(
        TIMEOUT,
        "the server to hold the strangers it has room for",
        || server.connections.open() <= 8 + 1,
    );
    // The authenticated connection kept its slot...
    assert_eq!(token_request(&mut known).0, 200);
    // ...and a new client with the token is answered at once.
    let t = Instant::now();
    let mut fresh = connect(server.addr);
    assert_eq!(token_request(&mut fresh).0, 200);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    // The oldest strangers were closed to make room.
    let mut first = idle.into_iter().next().unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(first.read(&mut byte).unwrap_or(0), 0);
}

#[test]
fn a_stranger_idles_briefly_a_token_holder_long() {
    let server = start(Limits {
        unauthenticated_idle: Duration::from_millis(300),
        idle: Duration::from_secs(60),
        ..Limits::default()
    });
    let mut stranger = connect(server.addr);
    let mut known = connect(server.addr);
    assert_eq!(token_request(&mut known).0, 200);
    let t = Instant::now();
    let mut byte = [0u8; 1];
    assert_eq!(stranger.read(&mut byte).unwrap_or(0), 0);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        t.elapsed()
    );
    // Well past the strangers' idle time, the token holder's connection
    // still serves (the wait is what is tested: idling).
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(token_request(&mut known).0, 200);
}
