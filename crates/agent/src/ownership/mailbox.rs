//! A group actor's inbox: holds the latest view the store watcher handed
//! over, not a queue. An actor busy with a transition (a hook may take
//! minutes) picks up the newest view when it is done; older ones are
//! worthless, so the watcher never waits and memory stays bounded.

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
    closed: bool,
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

    /// The latest view, waiting for one; None once closed.
    pub fn take(&self) -> Option<Seen> {
        let mut slot = self.slot.lock();
        loop {
            if slot.closed {
                return None;
            }
            if let Some(seen) = slot.latest.take() {
                return Some(seen);
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
        assert_eq!(mailbox.take().map(|s| s.view.revision), Some(3));
        mailbox.put(seen(4));
        mailbox.close();
        assert!(
            mailbox.take().is_none(),
            "closed: nothing more, not even a waiting view"
        );
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
