//! The actor pool: the groups' actors ([`super::actor`]) run on a few
//! threads, not one thread per group. A group with input (a view, a
//! fence) is queued once ([`super::mailbox`] says when); a worker takes
//! it, runs its actor until its inbox is empty, and takes the next one. A
//! group is on one worker at most, so its role changes stay serialized.
//!
//! Up to [`WORKERS`] workers run; store transactions (bounded by the
//! client's timeout) run on them. An effect that may block for long — a
//! role change, a hook, a VM start or stop, a migration drain — runs
//! inside [`Pool::blocking`]: while it does, another worker may start
//! (up to [`BLOCKING`] such effects at once beyond the [`WORKERS`]), so a
//! slow hook of one group delays no other group. A worker left over when
//! its effect ends retires once it finished that group. An idle agent
//! has at most [`WORKERS`] actor threads, whatever its number of groups.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use tracing::error;

use super::{Handle, Member};

/// Workers that take queued groups.
pub(crate) const WORKERS: usize = 4;
/// Long effects that get a worker of their own beyond [`WORKERS`]; more
/// run on their group's worker without a replacement.
pub(crate) const BLOCKING: usize = 60;

#[derive(Default)]
struct State {
    queue: VecDeque<Arc<Member>>,
    /// Workers alive.
    workers: usize,
    /// Workers inside a long effect.
    blocked: usize,
    /// Workers waiting for a group.
    idle: usize,
    closed: bool,
    threads: Vec<JoinHandle<()>>,
    spawned: u64,
}

impl State {
    /// Workers not inside a long effect.
    fn free(&self) -> usize {
        self.workers - self.blocked
    }

    /// Whether a worker should start for the queued groups.
    fn wants_worker(&self) -> bool {
        !self.closed
            && self.queue.len() > self.idle
            && self.free() < WORKERS
            && self.workers < WORKERS + BLOCKING
    }
}

#[derive(Default)]
pub(crate) struct Pool {
    state: Mutex<State>,
    ready: Condvar,
}

impl Pool {
    /// Queues `m` (its inbox just asked for it: it is in no queue and on no
    /// worker).
    pub fn schedule(&self, h: &Arc<Handle>, m: Arc<Member>) {
        self.schedule_all(h, vec![m]);
    }

    /// Queues every group of `ms` (each inbox just asked for it), waking
    /// each idle worker at most once for the lot: the store watcher hands
    /// over every group's view in one round, and a wake-up per group would
    /// cost more than the groups' turns.
    pub fn schedule_all(&self, h: &Arc<Handle>, ms: Vec<Arc<Member>>) {
        if ms.is_empty() {
            return;
        }
        let mut st = self.state.lock();
        if st.closed {
            return;
        }
        let n = ms.len();
        st.queue.extend(ms);
        for _ in 0..n.min(st.idle) {
            self.ready.notify_one();
        }
        while st.wants_worker() {
            let before = st.workers;
            Self::spawn(&mut st, h);
            if st.workers == before {
                break;
            }
        }
    }

    /// Runs `f`, a long effect of the group on this worker; another worker
    /// may take the queued groups meanwhile.
    pub fn blocking<T>(&self, h: &Arc<Handle>, f: impl FnOnce() -> T) -> T {
        {
            let mut st = self.state.lock();
            st.blocked += 1;
            if st.wants_worker() {
                Self::spawn(&mut st, h);
            }
        }
        let out = f();
        self.state.lock().blocked -= 1;
        out
    }

    /// No more groups are taken; waits for every worker to finish the
    /// group it runs (the actors end after the step they are in once
    /// decisions stopped).
    pub fn close(&self) {
        let threads = {
            let mut st = self.state.lock();
            st.closed = true;
            st.queue.clear();
            self.ready.notify_all();
            std::mem::take(&mut st.threads)
        };
        for t in threads {
            let _ = t.join();
        }
    }

    fn spawn(st: &mut State, h: &Arc<Handle>) {
        st.threads.retain(|t| !t.is_finished());
        let name = format!("own-{}", st.spawned);
        let worker = {
            let h = Arc::clone(h);
            std::thread::Builder::new()
                .name(name)
                .spawn(move || work(&h))
        };
        match worker {
            Ok(t) => {
                st.spawned += 1;
                st.workers += 1;
                st.threads.push(t);
            }
            // The workers running go on taking groups.
            Err(e) => error!(workers = st.workers, "cannot start an actor worker: {e}"),
        }
    }

    /// The next group to run; None when this worker is to end.
    fn next(&self) -> Option<Arc<Member>> {
        let mut st = self.state.lock();
        loop {
            // A worker started for a long effect that has ended since.
            if st.free() > WORKERS {
                st.workers -= 1;
                return None;
            }
            if let Some(m) = st.queue.pop_front() {
                return Some(m);
            }
            if st.closed {
                st.workers -= 1;
                return None;
            }
            st.idle += 1;
            self.ready.wait(&mut st);
            st.idle -= 1;
        }
    }
}

fn work(h: &Arc<Handle>) {
    while let Some(m) = h.pool.next() {
        super::actor::turn(h, &m);
    }
}
