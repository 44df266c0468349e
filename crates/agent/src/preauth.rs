//! What the peer port spends on connections (docs/PEER.md, "Bounds"):
//! decisions without I/O, driven by the peer listener
//! (`crate::replication`).
//!
//! * [`Waiting`]: connections accepted and not yet authenticated that have
//!   sent nothing: at most a fixed number, each for a limited time, the
//!   oldest closed when a new one comes. They cost a descriptor each, no
//!   thread.
//! * [`Sessions`]: authenticated sessions, at most so many in all and so
//!   many per peer site, so that one site cannot take every slot.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Connections waiting for their first bytes, oldest first.
pub(crate) struct Waiting<T> {
    items: VecDeque<(T, Instant)>,
    cap: usize,
    timeout: Duration,
}

impl<T> Waiting<T> {
    /// At most `cap` connections, each for at most `timeout` from its
    /// acceptance.
    pub fn new(cap: usize, timeout: Duration) -> Waiting<T> {
        Waiting {
            items: VecDeque::new(),
            cap: cap.max(1),
            timeout,
        }
    }

    /// Adds a connection accepted at `now`; returns the oldest one when
    /// this makes too many (to be closed).
    pub fn push(&mut self, item: T, now: Instant) -> Option<T> {
        self.items.push_back((item, now));
        if self.items.len() > self.cap {
            self.items.pop_front().map(|(old, _)| old)
        } else {
            None
        }
    }

    /// Removes the connections that have waited `timeout` or longer.
    pub fn expire(&mut self, now: Instant) -> Vec<T> {
        let mut gone = Vec::new();
        while let Some((_, at)) = self.items.front() {
            if now.saturating_duration_since(*at) < self.timeout {
                break;
            }
            if let Some((item, _)) = self.items.pop_front() {
                gone.push(item);
            }
        }
        gone
    }

    /// When the oldest connection expires.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.items.front().map(|(_, at)| *at + self.timeout)
    }

    /// The waiting connections, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.iter().map(|(item, _)| item)
    }

    /// Removes the connections at `indices` (positions in [`Waiting::iter`]
    /// order, ascending) and returns each with when it was accepted.
    pub fn take(&mut self, indices: &[usize]) -> Vec<(T, Instant)> {
        let mut taken = Vec::with_capacity(indices.len());
        for &i in indices.iter().rev() {
            if let Some(entry) = self.items.remove(i) {
                taken.push(entry);
            }
        }
        taken.reverse();
        taken
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }
}

/// Why an authenticated session is not admitted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Full {
    #[error("{running} replication sessions are running, the most this site allows")]
    Total { running: usize },
    #[error(
        "site {site} already has {running} replication sessions here, the most one site may have"
    )]
    Site { site: String, running: usize },
}

/// Authenticated sessions by peer site.
pub(crate) struct Sessions {
    total: usize,
    per_site: usize,
    running: usize,
    by_site: HashMap<String, usize>,
}

impl Sessions {
    pub fn new(total: usize, per_site: usize) -> Sessions {
        Sessions {
            total,
            per_site,
            running: 0,
            by_site: HashMap::new(),
        }
    }

    /// Admits one more session from `site`, or says why not.
    pub fn admit(&mut self, site: &str) -> Result<(), Full> {
        if self.running >= self.total {
            return Err(Full::Total {
                running: self.running,
            });
        }
        let of_site = self.by_site.get(site).copied().unwrap_or(0);
        if of_site >= self.per_site {
            return Err(Full::Site {
                site: site.to_owned(),
                running: of_site,
            });
        }
        self.running += 1;
        self.by_site.insert(site.to_owned(), of_site + 1);
        Ok(())
    }

    /// A session of `site` ended.
    pub fn release(&mut self, site: &str) {
        if let Some(n) = self.by_site.get_mut(site) {
            *n -= 1;
            self.running -= 1;
            if *n == 0 {
                self.by_site.remove(site);
            }
        }
    }

    #[cfg(test)]
    pub fn running(&self) -> usize {
        self.running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_keeps_the_newest_and_expires_the_old() {
        let t0 = Instant::now();
        let mut w = Waiting::new(3, Duration::from_secs(5));
        for i in 0..3 {
            assert_eq!(w.push(i, t0 + Duration::from_secs(i)), None);
        }
        // A fourth displaces the oldest.
        assert_eq!(w.push(3, t0 + Duration::from_secs(3)), Some(0));
        assert_eq!(w.iter().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(w.next_expiry(), Some(t0 + Duration::from_secs(6)));
        assert!(w.expire(t0 + Duration::from_millis(5999)).is_empty());
        assert_eq!(w.expire(t0 + Duration::from_secs(7)), [1, 2]);
        assert_eq!(w.len(), 1);
        let mut w = Waiting::new(10, Duration::from_secs(5));
        for i in 0..5 {
            w.push(i, t0);
        }
        let taken: Vec<u64> = w.take(&[1, 3]).into_iter().map(|(i, _)| i).collect();
        assert_eq!(taken, [1, 3]);
        assert_eq!(w.iter().copied().collect::<Vec<_>>(), [0, 2, 4]);
    }

    #[test]
    fn sessions_are_capped_in_all_and_per_site() {
        let mut s = Sessions::new(3, 2);
        assert_eq!(s.admit("ny"), Ok(()));
        assert_eq!(s.admit("ny"), Ok(()));
        assert_eq!(
            s.admit("ny"),
            Err(Full::Site {
                site: "ny".into(),
                running: 2
            })
        );
        assert_eq!(s.admit("dr"), Ok(()));
        assert_eq!(s.admit("sea"), Err(Full::Total { running: 3 }));
        s.release("ny");
        assert_eq!(s.running(), 2);
        assert_eq!(s.admit("sea"), Ok(()));
        s.release("dr");
        s.release("dr"); // not running: no effect on the others
        assert_eq!(s.running(), 2);
    }
}
