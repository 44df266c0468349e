//! How much memory NBD requests may hold: per connection and agent-wide.
//!
//! Every request is charged when its header is read: [`REQUEST_OVERHEAD`]
//! bytes for any request (flushes and other zero-length requests
//! included), plus twice its write payload while that is being applied
//! (the payload, and the copy the change capture takes of it), plus its
//! read reply until that reply has been written to the socket. A
//! connection starts a new request only if [`admits`] says so, and only
//! once the agent-wide [`Budget`] grants the bytes; until then its thread
//! reads nothing more from the client (it keeps writing replies). So a
//! client that stops reading its replies stops being served once its
//! unsent replies reach [`CONNECTION_BUDGET`] or [`MAX_REQUESTS`], and the
//! payload memory of all connections together stays under
//! [`AGENT_BUDGET`] (plus one request, when a single request is larger
//! than what is left).

use std::sync::{Arc, Weak};

use parking_lot::Mutex;

/// Bytes one connection's requests in progress (payloads held, replies
/// not yet sent) may hold; one request may exceed it when it is alone.
pub const CONNECTION_BUDGET: usize = 32 << 20;
/// Requests one connection may have in progress (received, reply not yet
/// written to its socket).
pub const MAX_REQUESTS: usize = 512;
/// Charged for every request besides its payload: header, job, reply.
pub const REQUEST_OVERHEAD: usize = 1024;
/// Bytes of request payloads and replies the whole agent holds at once.
pub const AGENT_BUDGET: usize = 256 << 20;

/// Whether a connection holding `charged` bytes in `requests` requests
/// may start one more costing `cost` bytes.
pub fn admits(charged: usize, requests: usize, cost: usize) -> bool {
    requests == 0 || (requests < MAX_REQUESTS && charged.saturating_add(cost) <= CONNECTION_BUDGET)
}

/// What the budget calls when bytes come back, so a waiting connection
/// tries again.
pub trait Wake: Send + Sync {
    fn wake(&self);
}

#[derive(Default)]
struct State {
    used: usize,
    waiting: Vec<Weak<dyn Wake>>,
}

/// An agent-wide semaphore of bytes.
pub struct Budget {
    limit: usize,
    state: Mutex<State>,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            state: Mutex::new(State::default()),
        })
    }

    /// Takes `bytes` if they fit (a request larger than the whole budget
    /// fits when nothing else is held). Otherwise `waiter` is woken at the
    /// next release and should try again.
    pub fn try_acquire(&self, bytes: usize, waiter: &Arc<dyn Wake>) -> bool {
        let mut state = self.state.lock();
        if state.used == 0 || state.used.saturating_add(bytes) <= self.limit {
            state.used += bytes;
            return true;
        }
        state.waiting.push(Arc::downgrade(waiter));
        false
    }

    pub fn release(&self, bytes: usize) {
        let waiting = {
            let mut state = self.state.lock();
            state.used = state.used.saturating_sub(bytes);
            std::mem::take(&mut state.waiting)
        };
        for waiter in waiting {
            if let Some(w) = waiter.upgrade() {
                w.wake();
            }
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.state.lock().used
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use proptest::prelude::*;

    use super::*;

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_lone_request_is_admitted_whatever_its_size() {
        assert!(admits(0, 0, usize::MAX));
        assert!(!admits(1, 1, CONNECTION_BUDGET));
        assert!(admits(0, 1, REQUEST_OVERHEAD));
    }

    #[test]
    fn zero_length_requests_count() {
        // Flushes alone fill the request count.
        let mut requests = 0;
        let mut charged = 0;
        while admits(charged, requests, REQUEST_OVERHEAD) {
            requests += 1;
            charged += REQUEST_OVERHEAD;
        }
        assert_eq!(requests, MAX_REQUESTS);
    }

    #[test]
    fn budget_wakes_waiters_on_release() {
        let budget = Budget::new(100);
        let count = Arc::new(Count::default());
        let waiter: Arc<dyn Wake> = count.clone();
        assert!(budget.try_acquire(60, &waiter));
        assert!(!budget.try_acquire(60, &waiter));
        assert_eq!(count.0.load(Ordering::Relaxed), 0);
        budget.release(60);
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        assert!(budget.try_acquire(60, &waiter));
        // Alone, a request larger than the budget is granted.
        budget.release(60);
        assert!(budget.try_acquire(1000, &waiter));
        assert_eq!(budget.used(), 1000);
    }

    proptest! {
        #[test]
        fn admitted_requests_stay_within_the_connection_budget(
            costs in proptest::collection::vec(0usize..(64 << 20), 1..200)
        ) {
            let (mut charged, mut requests) = (0usize, 0usize);
            for cost in costs {
                if admits(charged, requests, cost) {
                    charged += cost;
                    requests += 1;
                }
                prop_assert!(requests <= MAX_REQUESTS);
                prop_assert!(requests <= 1 || charged <= CONNECTION_BUDGET);
            }
        }
    }
}
