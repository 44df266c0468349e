//! A group actor's inbox: holds the latest view the store watcher handed
//! over, not a queue. An actor busy with a transition (a hook may take
//! minutes) picks up the newest view when it is done; older ones are
//! worthless, so the watcher never waits and memory stays bounded. Beside
//! it, a flag: the fencer destroyed the group's VM (the machine must
//! know before it acts on any view).
//!
//! The inbox also says whether the group is *scheduled*: handed to the
//! actor pool (`super::pool`) and not yet found empty by the worker
//! running it. Whoever puts the first input into an unscheduled inbox is
//! told to schedule it; a worker that finds it empty unschedules it in
//! the same step. So a group is in the pool's queue or on one worker at
//! most once, and no input is left without a worker coming for it.

use std::time::{Duration, Instant};

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
    /// In the pool's queue or on a worker.
    scheduled: bool,
}

impl Slot {
    /// Marks the slot scheduled; whether it was not (the caller must hand
    /// the group to the pool).
    fn schedule(&mut self) -> bool {
        !std::mem::replace(&mut self.scheduled, true)
    }
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
    /// The group became unscheduled (for [`Mailbox::wait_unscheduled`]).
    unscheduled: Condvar,
}

impl Mailbox {
    /// Replaces what is waiting with `seen`. True when the group must be
    /// handed to the pool (it was not scheduled).
    #[must_use]
    pub fn put(&self, seen: Seen) -> bool {
        let mut slot = self.slot.lock();
        if slot.closed {
            return false;
        }
        slot.latest = Some(seen);
        slot.schedule()
    }

    /// The fencer destroyed the VM. True when the group must be handed to
    /// the pool.
    #[must_use]
    pub fn fenced(&self) -> bool {
        let mut slot = self.slot.lock();
        if slot.closed {
            return false;
        }
        slot.fenced = true;
        slot.schedule()
    }

    /// A fence first, else the latest view. None when there is nothing
    /// (or the inbox is closed): the group is unscheduled in the same
    /// step, so the next `put` schedules it again.
    pub fn try_take(&self) -> Option<Taken> {
        let mut slot = self.slot.lock();
        if !slot.closed {
            if std::mem::take(&mut slot.fenced) {
                return Some(Taken::Fenced);
            }
            if let Some(seen) = slot.latest.take() {
                return Some(Taken::View(Box::new(seen)));
            }
        }
        slot.scheduled = false;
        self.unscheduled.notify_all();
        None
    }

    /// No more inputs: `try_take` returns None from now on.
    pub fn close(&self) {
        let mut slot = self.slot.lock();
        slot.closed = true;
        slot.latest = None;
    }

    /// Waits until no worker runs the group and it is in no queue (after
    /// [`Mailbox::close`]: until its actor finished the step it was in);
    /// false after `timeout`.
    pub fn wait_unscheduled(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut slot = self.slot.lock();
        while slot.scheduled {
            if self.unscheduled.wait_until(&mut slot, deadline).timed_out() {
                return !slot.scheduled;
            }
        }
        true
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
        assert!(mailbox.put(seen(1)), "the first input schedules the group");
        assert!(!mailbox.put(seen(2)), "scheduled already");
        assert!(!mailbox.put(seen(3)));
        assert!(matches!(mailbox.try_take(), Some(Taken::View(s)) if s.view.revision == 3));
        assert!(!mailbox.put(seen(4)), "still on its worker");
        mailbox.close();
        assert!(
            mailbox.try_take().is_none(),
            "closed: nothing more, not even a waiting view"
        );
        assert!(mailbox.wait_unscheduled(Duration::ZERO));
        assert!(!mailbox.put(seen(5)), "closed: never scheduled again");
    }

    #[test]
    fn a_fence_comes_before_any_view() {
        let mailbox = Mailbox::default();
        assert!(mailbox.put(seen(1)));
        assert!(!mailbox.fenced());
        assert!(!mailbox.fenced());
        assert!(matches!(mailbox.try_take(), Some(Taken::Fenced)));
        assert!(matches!(mailbox.try_take(), Some(Taken::View(s)) if s.view.revision == 1));
    }

    #[test]
    fn an_empty_inbox_is_unscheduled_and_the_next_input_schedules_it() {
        let mailbox = Mailbox::default();
        assert!(mailbox.fenced());
        assert!(matches!(mailbox.try_take(), Some(Taken::Fenced)));
        assert!(
            !mailbox.wait_unscheduled(Duration::from_millis(10)),
            "its worker has not found it empty yet"
        );
        assert!(mailbox.try_take().is_none());
        assert!(mailbox.wait_unscheduled(Duration::ZERO));
        assert!(
            mailbox.put(seen(7)),
            "unscheduled: the next input schedules it"
        );
    }

    #[test]
    fn unscheduling_wakes_a_waiter() {
        let mailbox = std::sync::Arc::new(Mailbox::default());
        assert!(mailbox.put(seen(1)));
        mailbox.close();
        let waiter = {
            let mailbox = std::sync::Arc::clone(&mailbox);
            std::thread::spawn(move || mailbox.wait_unscheduled(Duration::from_secs(10)))
        };
        assert!(mailbox.try_take().is_none());
        assert!(waiter.join().unwrap_or(false));
    }
}
