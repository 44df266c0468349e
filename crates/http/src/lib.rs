//! A small, bounded HTTP/1.1 server for Tandem's own endpoints: the
//! witness (`tandem witness`) and the agent's REST API (`site.api`).
//!
//! Just enough HTTP/1.1: requests with a `Content-Length` body (no chunked
//! bodies), keep-alive, `Expect: 100-continue`, and hard limits on
//! everything a peer controls — head size, body size (refused before a byte
//! of it is read or allocated), the time a request may take to arrive, how
//! long a connection may idle, and how many connections are served at once.
//! Connection slots (`slots`): connections not yet authenticated share a
//! small pool whose oldest idle member is closed for a newcomer, so idle
//! strangers cannot lock anyone out; a connection that proves who it is (a
//! verified client certificate through [`Secure`], or a handler marking an
//! answer [`Response::authenticated_as`]) keeps a slot of its identity's
//! own.
//! Each connection has its own thread, so one long request (a witness long
//! poll, an agent's verify or failover) never delays another.
//!
//! Tandem does not use a general HTTP server library here: the one at hand
//! (tiny_http 0.12) allocates a buffer as large as any `Content-Length` a
//! peer claims when it discards an unread body, so one request with a huge
//! length aborts the process — and a dead witness fences every primary, a
//! dead agent stops serving its disks (SPEC G8).
//!
//! - [`spawn`] serves a listener with a [`Handler`] until a stop flag is set
//!   ([`spawn_counted`] also counts its open [`Connections`]).
//! - [`Conn`] is one connection, for a caller that runs its own loop.

#![forbid(unsafe_code)]

mod conn;
mod server;
mod slots;

pub use conn::{shorten, Conn, Limits, Next, Problem, Refusal, Request, Response, Transport};
pub use server::{spawn, spawn_counted, Connections, Handler, Options, Secure};
