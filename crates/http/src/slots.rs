//! Connection slots: who holds one, and whom to close to make room.
//!
//! A new connection is *unauthenticated*. Those live in a pool of at most
//! [`Limits::max_unauthenticated`]: when it is full, the oldest one not
//! inside a request (else the oldest) is closed for the newcomer, so idle
//! strangers cannot lock anyone out. A connection that proves who it is
//! (a verified client certificate, a request with a valid token) moves to
//! its identity's own slots, at most [`Limits::max_per_identity`] each (the
//! identity's oldest idle one makes room), and is never closed for a
//! stranger. [`Limits::max_connections`] caps everything.

use std::net::{Shutdown, TcpStream};
use std::time::Instant;

use parking_lot::Mutex;

use crate::conn::Limits;

/// A slot's number.
pub(crate) type SlotId = u64;

struct Entry {
    id: SlotId,
    since: Instant,
    identity: Option<String>,
    /// Inside a request's handler.
    busy: bool,
    /// A clone of the socket, to close it from here.
    tcp: TcpStream,
}

/// What [`Slots::admit`] gave.
pub(crate) enum Admitted {
    Slot(SlotId),
    /// Every slot is held by authenticated connections.
    Full,
}

pub(crate) struct Slots {
    limits: Limits,
    inner: Mutex<Inner>,
}

struct Inner {
    next: SlotId,
    entries: Vec<Entry>,
}

impl Slots {
    pub(crate) fn new(limits: Limits) -> Slots {
        Slots {
            limits,
            inner: Mutex::new(Inner {
                next: 1,
                entries: Vec::new(),
            }),
        }
    }

    /// A slot for a new, unauthenticated connection.
    pub(crate) fn admit(&self, tcp: TcpStream) -> Admitted {
        let mut inner = self.inner.lock();
        let strangers = inner
            .entries
            .iter()
            .filter(|e| e.identity.is_none())
            .count();
        if strangers >= self.limits.max_unauthenticated.max(1)
            || inner.entries.len() >= self.limits.max_connections
        {
            let oldest = pick(&inner.entries, |e| e.identity.is_none());
            match oldest {
                Some(i) => close(&mut inner, i, "to make room for a new connection"),
                None => return Admitted::Full,
            }
        }
        let id = inner.next;
        inner.next += 1;
        inner.entries.push(Entry {
            id,
            since: Instant::now(),
            identity: None,
            busy: false,
            tcp,
        });
        Admitted::Slot(id)
    }

    /// Moves a connection to `identity`'s slots; false when that identity
    /// holds its maximum and none of them is idle (close the connection).
    pub(crate) fn authenticate(&self, id: SlotId, identity: &str) -> bool {
        let mut inner = self.inner.lock();
        let Some(me) = inner.entries.iter().position(|e| e.id == id) else {
            return false;
        };
        if inner.entries[me].identity.as_deref() == Some(identity) {
            return true;
        }
        let held = inner
            .entries
            .iter()
            .filter(|e| e.identity.as_deref() == Some(identity))
            .count();
        if held >= self.limits.max_per_identity.max(1) {
            let idle = pick(&inner.entries, |e| {
                e.identity.as_deref() == Some(identity) && !e.busy
            })
            .filter(|&i| !inner.entries[i].busy);
            match idle {
                Some(i) => close(&mut inner, i, "to make room for a newer one"),
                None => return false,
            }
        }
        if let Some(e) = inner.entries.iter_mut().find(|e| e.id == id) {
            e.identity = Some(identity.to_owned());
            e.since = Instant::now();
        }
        true
    }

    pub(crate) fn busy(&self, id: SlotId, busy: bool) {
        if let Some(e) = self.inner.lock().entries.iter_mut().find(|e| e.id == id) {
            e.busy = busy;
        }
    }

    pub(crate) fn release(&self, id: SlotId) {
        self.inner.lock().entries.retain(|e| e.id != id);
    }
}

/// The oldest entry matching `which`, preferring one not inside a request.
fn pick(entries: &[Entry], which: impl Fn(&Entry) -> bool) -> Option<usize> {
    let oldest = |busy: bool| {
        entries
            .iter()
            .enumerate()
            .filter(|(_, e)| which(e) && e.busy == busy)
            .min_by_key(|(_, e)| e.since)
            .map(|(i, _)| i)
    };
    oldest(false).or_else(|| oldest(true))
}

/// Closes entry `i`'s socket (its thread sees the end and frees the slot,
/// which is taken out of the count now).
fn close(inner: &mut Inner, i: usize, why: &str) {
    let e = inner.entries.swap_remove(i);
    let peer = e
        .tcp
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    match &e.identity {
        None => tracing::info!(%peer, "closing an unauthenticated connection {why}"),
        Some(identity) => tracing::info!(%peer, %identity, "closing an idle connection {why}"),
    }
    let _ = e.tcp.shutdown(Shutdown::Both);
}
