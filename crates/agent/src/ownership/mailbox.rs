//! A group actor's inbox: holds the latest view the store watcher handed
//! over, not a queue. An actor busy with a transition (a hook may take
//! minutes) picks up the newest view when it is done; older ones are
//! worthless, so the watcher never waits and memory stays bounded. Beside
//! it, a flag: the fencer destroyed the group's VM (the machine must
//! know before it acts on any view).

use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use tandem_coordinator::keys::GroupView;
use tandem_coordinator::LeaseId;

/// What the store showed of one group.
#[derive(Debug)]
pub(crate) struct Seen {
    pub view: GroupView,
    pub lease: LeaseId,
    /// When the read was sent (ownership it shows may be acted on for a
    /// lease's worth of time from here).
    pub sent: Instant,
}

#[derive(Default)]
struct Slot {
    latest: Option<Seen>,
    fenced: bool,
    closed: bool,
}

/// What an actor takes from its mailbox.
#[derive(Debug)]
pub(crate) enum Taken {
    /// The fencer destroyed the VM.
    Fenced,
    View(Box<Seen>),
}

#[derive(Default)]
pub(crate) struct Mailbox {
    slot: Mutex<Slot>,
    arrived: Condvar,
}

impl Mailbox {
    /// Replaces what is waiting with `seen`.
    pub fn put(&self, seen: Seen) {
        let mut slot = self.slot.lock();
        if !slot.closed {
            slot.latest = Some(seen);
            self.arrived.notify_one();
        }
    }

    /// The fencer destroyed the VM.
    pub fn fenced(&self) {
        let mut slot = self.slot.lock();
        if !slot.closed {
            slot.fenced = true;
            self.arrived.notify_one();
        }
    }

    /// A fence first, else the latest view, waiting for one; None once
    /// closed.
    pub fn take(&self) -> Option<Taken> {
        let mut slot = self.slot.lock();
        loop {
            if slot.closed {
                return None;
            }
            if std::mem::take(&mut slot.fenced) {
                return Some(Taken::Fenced);
            }
            if let Some(seen) = slot.latest.take() {
                return Some(Taken::View(Box::new(seen)));
            }
            self.arrived.wait(&mut slot);
        }
    }

    /// No more views: `take` returns None from now on.
    pub fn close(&self) {
        self.slot.lock().closed = true;
        self.arrived.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(revision: i64) -> Seen {
        Seen {
            view: GroupView {
                revision,
                ..GroupView::default()
            },
            lease: 1,
            sent: Instant::now(),
        }
    }

    #[test]
    fn a_busy_actor_gets_only_the_latest_view() {
        let mailbox = Mailbox::default();
        mailbox.put(seen(1));
        mailbox.put(seen(2));
        mailbox.put(seen(3));
        assert!(matches!(mailbox.take(), Some(Taken::View(s)) if s.view.revision == 3));
        mailbox.put(seen(4));
        mailbox.close();
        assert!(
            mailbox.take().is_none(),
            "closed: nothing more, not even a waiting view"
        );
    }

    #[test]
    fn a_fence_comes_before_any_view() {
        let mailbox = Mailbox::default();
        mailbox.put(seen(1));
        mailbox.fenced();
        mailbox.fenced();
        assert!(matches!(mailbox.take(), Some(Taken::Fenced)));
        assert!(matches!(mailbox.take(), Some(Taken::View(s)) if s.view.revision == 1));
    }

    #[test]
    fn close_wakes_a_waiting_actor() {
        let mailbox = std::sync::Arc::new(Mailbox::default());
        let actor = {
            let mailbox = std::sync::Arc::clone(&mailbox);
            std::thread::spawn(move || mailbox.take().is_none())
        };
        mailbox.close();
        assert!(actor.join().unwrap_or(false));
    }
}
