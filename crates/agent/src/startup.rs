//! Opening and stopping many groups: a bounded number at a time, never
//! one after another. At start the groups open on [`OPENERS`] threads (a
//! group's shippers connect to their peers as it opens, so the peers and
//! the coordinator see the groups arrive spread over the start, not all
//! in one instant, and not a thousand threads at once). At stop every
//! group stops on one of [`STOPPERS`] threads; each stop waits for its own
//! threads by wake-ups, so the whole stop takes about as long as the
//! slowest group's, not the sum of all.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tracing::warn;

use crate::group::{GroupRuntime, Groups, Shared};
use crate::ownership::Handle;
use crate::rolefile::{self, RoleRecord};
use crate::{AgentError, INITIAL_EPOCH};

/// Groups opening at once.
pub(crate) const OPENERS: usize = 8;
/// Groups stopping at once.
pub(crate) const STOPPERS: usize = 64;

/// Takes the data directory for this agent (an exclusive flock on
/// `<data_dir>/agent.lock`, held while the returned file is open): a second
/// agent on the same directory is refused before it listens or opens
/// anything.
pub(crate) fn lock_data_dir(layout: &crate::Layout) -> Result<std::fs::File, AgentError> {
    let path = layout.agent_lock();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| AgentError::Io {
            path: path.clone(),
            what: "open",
            source,
        })?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(AgentError::DataDirInUse {
            path: layout.data_dir.clone(),
        }),
        Err(e) => Err(AgentError::Io {
            path,
            what: "lock",
            source: e.into(),
        }),
    }
}

/// Runs `each` for every item on at most `threads` scoped threads, each
/// taking the next item; stops taking items once `each` returned an error
/// and returns the first one.
fn bounded<T: Sync>(
    items: &[T],
    threads: usize,
    each: impl Fn(&T) -> Result<(), AgentError> + Sync,
) -> Option<AgentError> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.min(items.len()) {
            s.spawn(|| {
                while !failed.load(Ordering::Acquire) {
                    let Some(item) = items.get(next.fetch_add(1, Ordering::AcqRel)) else {
                        return;
                    };
                    if let Err(e) = each(item) {
                        failed.store(true, Ordering::Release);
                        first_error.lock().get_or_insert(e);
                    }
                }
            });
        }
    });
    first_error.into_inner()
}

/// Opens every group of `members` in the role its role file names (the
/// configured one at first start) and adds it to `groups` and, with a
/// coordinator, to the ownership driver as soon as it is open.
pub(crate) fn open_groups(
    shared: &Shared,
    groups: &Groups,
    ownership: Option<Arc<Handle>>,
    members: &[&tandem_config::Group],
) -> Result<(), AgentError> {
    let here = &shared.site;
    let opened = bounded(members, OPENERS, |group| {
        if shared.stop.load(Ordering::Acquire) {
            return Err(AgentError::Stopping);
        }
        let rt = Arc::new(GroupRuntime::new((*group).clone()));
        let record = rolefile::load(&shared.layout.data_dir, &group.name)?.unwrap_or(RoleRecord {
            primary: group.primary == *here,
            epoch: INITIAL_EPOCH,
            fork_epoch: 0,
            fork_seq: 0,
        });
        rt.open(shared, &record)?;
        groups.push(Arc::clone(&rt));
        if let Some(o) = &ownership {
            o.add(rt, &record)?;
        }
        Ok(())
    });
    match opened {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Stops every group's role (agent stop), at most [`STOPPERS`] at once;
/// the first error (each is logged).
pub(crate) fn stop_groups(
    shared: &Shared,
    groups: &[Arc<GroupRuntime>],
    grace: Duration,
) -> Option<AgentError> {
    let errors = Mutex::new(None);
    let none = bounded(groups, STOPPERS, |rt| {
        if let Err(e) = rt.stop_graceful(shared, grace) {
            warn!(group = rt.name(), "final flush failed: {e}");
            errors.lock().get_or_insert(e);
        }
        Ok(())
    });
    debug_assert!(none.is_none(), "stopping goes on past a failed group");
    errors.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_second_agent_on_a_data_dir_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = crate::Layout::new(dir.path());
        let first = lock_data_dir(&layout).expect("first agent");
        match lock_data_dir(&layout) {
            Err(AgentError::DataDirInUse { path }) => assert_eq!(path, dir.path()),
            other => panic!("second agent: {other:?}"),
        }
        drop(first);
        assert!(
            lock_data_dir(&layout).is_ok(),
            "free again once the first ends"
        );
    }

    #[test]
    fn bounded_runs_every_item_at_most_n_at_once() {
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let done = Mutex::new(Vec::new());
        let items: Vec<usize> = (0..40).collect();
        let started = Instant::now();
        let error = bounded(&items, 8, |i| {
            let now = running.fetch_add(1, Ordering::AcqRel) + 1;
            most.fetch_max(now, Ordering::AcqRel);
            std::thread::sleep(Duration::from_millis(20));
            running.fetch_sub(1, Ordering::AcqRel);
            done.lock().push(*i);
            Ok(())
        });
        assert!(error.is_none());
        let mut done = done.into_inner();
        done.sort_unstable();
        assert_eq!(done, items, "every item, once");
        assert!(most.load(Ordering::Acquire) <= 8, "at most 8 at once");
        assert!(
            started.elapsed() < Duration::from_millis(40 * 20),
            "not one after another: {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn bounded_stops_taking_items_after_an_error() {
        let taken = AtomicUsize::new(0);
        let items: Vec<usize> = (0..100).collect();
        let error = bounded(&items, 2, |i| {
            taken.fetch_add(1, Ordering::AcqRel);
            if *i == 3 {
                Err(AgentError::Stopping)
            } else {
                Ok(())
            }
        });
        assert!(matches!(error, Some(AgentError::Stopping)));
        assert!(
            taken.load(Ordering::Acquire) < 10,
            "items after the error are left: {}",
            taken.load(Ordering::Acquire)
        );
    }
}
