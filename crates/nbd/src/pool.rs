//! The agent's one NBD worker pool: runs the parts of requests that may
//! block (reads from disk, flushes, waits for replicas) for every
//! connection of every volume.
//!
//! Fair by construction: each connection has its own queue and workers
//! take jobs from the connections in turn (round robin), so a client with
//! a thousand queued flushes delays another client's job by at most one
//! job per busy connection, not by its whole backlog. Workers never touch
//! a socket: a finished reply goes to its connection's mailbox and the
//! connection's own thread writes it.
//!
//! Threads: at least [`MIN_WORKERS`], more started while jobs wait and no
//! worker is idle, up to [`MAX_WORKERS`]; a worker idle for
//! [`IDLE_EXIT`] ends (down to the minimum). The count depends on the
//! work in progress, never on the number of volumes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tracing::warn;

/// Workers kept even when idle.
pub const MIN_WORKERS: usize = 4;
/// Most workers at once (jobs may block for a replica's round trip in sync
/// mode, so this is well above the core count).
pub const MAX_WORKERS: usize = 64;
/// An idle worker above the minimum ends after this long.
const IDLE_EXIT: Duration = Duration::from_secs(10);

pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// Who a job belongs to (a connection).
pub(crate) type Owner = u64;

#[derive(Default)]
struct Queues {
    /// Owners with queued jobs, in the order they are served.
    ring: VecDeque<Owner>,
    jobs: HashMap<Owner, VecDeque<Job>>,
    /// Jobs queued, not yet taken.
    queued: usize,
    workers: usize,
    idle: usize,
    stopping: bool,
}

impl Queues {
    /// The next job, taking owners in turn.
    fn next(&mut self) -> Option<Job> {
        let owner = self.ring.pop_front()?;
        let queue = self.jobs.get_mut(&owner)?;
        let job = queue.pop_front();
        self.queued -= usize::from(job.is_some());
        if queue.is_empty() {
            self.jobs.remove(&owner);
        } else {
            self.ring.push_back(owner);
        }
        job
    }
}

/// A fair, elastic pool of worker threads.
pub struct Pool {
    queues: Mutex<Queues>,
    ready: Condvar,
}

impl Pool {
    pub fn new() -> Arc<Pool> {
        let pool = Arc::new(Pool {
            queues: Mutex::new(Queues::default()),
            ready: Condvar::new(),
        });
        for _ in 0..MIN_WORKERS {
            let mut queues = pool.queues.lock();
            Pool::spawn_worker(&pool, &mut queues);
        }
        pool
    }

    /// Threads running now.
    pub fn workers(&self) -> usize {
        self.queues.lock().workers
    }

    /// Queues `job` for `owner`.
    pub(crate) fn submit(self: &Arc<Self>, owner: Owner, job: Job) {
        let mut queues = self.queues.lock();
        if queues.stopping {
            drop(queues);
            job();
            return;
        }
        let queue = queues.jobs.entry(owner).or_default();
        queue.push_back(job);
        if queue.len() == 1 {
            queues.ring.push_back(owner);
        }
        queues.queued += 1;
        if queues.queued > queues.idle && queues.workers < MAX_WORKERS {
            Pool::spawn_worker(self, &mut queues);
        }
        self.ready.notify_one();
    }

    fn spawn_worker(pool: &Arc<Pool>, queues: &mut Queues) {
        let me = Arc::clone(pool);
        let spawned = thread::Builder::new()
            .name("nbd-worker".into())
            .spawn(move || me.work());
        match spawned {
            Ok(_) => {
                queues.workers += 1;
                // Counted idle until it takes its first job.
                queues.idle += 1;
            }
            Err(e) => warn!("could not start an NBD worker thread: {e}"),
        }
    }

    fn work(&self) {
        let mut queues = self.queues.lock();
        loop {
            if let Some(job) = queues.next() {
                queues.idle -= 1;
                drop(queues);
                job();
                queues = self.queues.lock();
                queues.idle += 1;
                continue;
            }
            if queues.stopping {
                break;
            }
            let timed_out = self.ready.wait_for(&mut queues, IDLE_EXIT).timed_out();
            if timed_out && queues.workers > MIN_WORKERS && queues.ring.is_empty() {
                break;
            }
        }
        queues.idle -= 1;
        queues.workers -= 1;
    }

    /// Runs what is queued and lets the workers end; later jobs run on the
    /// caller's thread.
    pub fn stop(&self) {
        self.queues.lock().stopping = true;
        self.ready.notify_all();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_served_in_turn() {
        let mut q = Queues::default();
        let order = Arc::new(Mutex::new(Vec::new()));
        let push = |q: &mut Queues, owner: Owner, tag: u32| {
            let order = Arc::clone(&order);
            let queue = q.jobs.entry(owner).or_default();
            queue.push_back(Box::new(move || order.lock().push(tag)));
            if queue.len() == 1 {
                q.ring.push_back(owner);
            }
            q.queued += 1;
        };
        // Owner 1 floods, owner 2 queues one job after the flood.
        for i in 0..100 {
            push(&mut q, 1, i);
        }
        push(&mut q, 2, 1000);
        for _ in 0..3 {
            q.next().unwrap()();
        }
        assert_eq!(*order.lock(), vec![0, 1000, 1]);
        while let Some(job) = q.next() {
            job();
        }
        assert_eq!(order.lock().len(), 101);
        assert!(q.jobs.is_empty());
    }

    #[test]
    fn pool_grows_with_blocked_jobs_and_runs_everything() {
        let pool = Pool::new();
        let (tx, rx) = crossbeam_channel::unbounded();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        for i in 0..10u64 {
            let (tx, gate) = (tx.clone(), Arc::clone(&gate));
            pool.submit(
                i,
                Box::new(move || {
                    let mut open = gate.0.lock();
                    while !*open {
                        gate.1.wait(&mut open);
                    }
                    tx.send(i).unwrap();
                }),
            );
        }
        assert!(pool.workers() >= 10, "{}", pool.workers());
        *gate.0.lock() = true;
        gate.1.notify_all();
        let mut got: Vec<u64> = (0..10)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        pool.stop();
    }
}
