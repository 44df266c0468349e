//! A stop flag that sleeping threads wait on: once raised it stays
//! raised, and every thread waiting on it wakes at once. For the agent's
//! periodic threads (bandwidth schedules, the VM keeper, the lease keeper,
//! the fencer), which otherwise would look at a flag many times a second
//! or sleep through a stop.

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

#[derive(Default)]
pub(crate) struct Signal {
    raised: Mutex<bool>,
    changed: Condvar,
}

impl Signal {
    /// Raises the signal: every waiter wakes, every later wait returns at
    /// once.
    pub fn raise(&self) {
        *self.raised.lock() = true;
        self.changed.notify_all();
    }

    pub fn is_raised(&self) -> bool {
        *self.raised.lock()
    }

    /// Sleeps for `period` or until raised; whether it is raised.
    pub fn wait(&self, period: Duration) -> bool {
        self.wait_until(Instant::now() + period)
    }

    /// Sleeps until `deadline` or until raised; whether it is raised.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let mut raised = self.raised.lock();
        while !*raised {
            if self.changed.wait_until(&mut raised, deadline).timed_out() {
                break;
            }
        }
        *raised
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_wait_lasts_its_period_unless_raised() {
        let s = Signal::default();
        let t = Instant::now();
        assert!(!s.wait(Duration::from_millis(30)));
        assert!(t.elapsed() >= Duration::from_millis(30));
        s.raise();
        assert!(s.is_raised());
        assert!(s.wait(Duration::from_secs(60)), "raised: returns at once");
    }

    #[test]
    fn raising_wakes_a_waiter_at_once() {
        let s = Arc::new(Signal::default());
        let waiter = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let t = Instant::now();
                (s.wait(Duration::from_secs(60)), t.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        s.raise();
        let (raised, waited) = waiter.join().unwrap_or((false, Duration::MAX));
        assert!(raised);
        assert!(waited < Duration::from_secs(10), "woke after {waited:?}");
    }
}
