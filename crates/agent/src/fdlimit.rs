//! The open-file limit: an agent with many volumes needs more descriptors
//! than the usual soft limit of 1,024 (it would fail to open its groups
//! near 130 of them). At start the soft limit is raised to the hard one,
//! and a limit still below what the configured volumes need is logged.
//!
//! Descriptors per volume and group, counted in the code (and measured by
//! `bench/scale.sh`): a primary volume holds its image, its dirty map and
//! its NBD listening socket (with the accept waker's duplicate); a replica
//! volume its image. A group holds its sequence file, journal, state file
//! and one peer connection per other site. Each NBD client and API
//! connection holds one more.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use tracing::{info, warn};

/// Descriptors of an agent with no group: logs, listeners, the
/// coordinator, API connections (up to 64), spare.
pub const BASE: u64 = 256;
/// Descriptors per volume, with room for a few NBD clients.
pub const PER_VOLUME: u64 = 8;
/// Descriptors per group (capture and journal files, peer connections).
pub const PER_GROUP: u64 = 8;
/// The soft limit set when the hard one is unlimited (Linux refuses more
/// than `fs.nr_open`, 1,048,576 by default).
const UNLIMITED_TARGET: u64 = 1 << 20;

/// Descriptors an agent with `volumes` volumes in `groups` groups may
/// need.
pub fn needed(groups: usize, volumes: usize) -> u64 {
    let (g, v) = (
        u64::try_from(groups).unwrap_or(u64::MAX),
        u64::try_from(volumes).unwrap_or(u64::MAX),
    );
    BASE.saturating_add(PER_VOLUME.saturating_mul(v))
        .saturating_add(PER_GROUP.saturating_mul(g))
}

/// The soft limit to ask for: the hard limit (a bounded stand-in when
/// unlimited), or None when the soft one is already there. `None` in a
/// limit is "unlimited".
pub fn raise_to(current: Option<u64>, maximum: Option<u64>) -> Option<u64> {
    let target = maximum.unwrap_or(UNLIMITED_TARGET);
    match current {
        None => None,
        Some(c) if c >= target => None,
        Some(_) => Some(target),
    }
}

/// Raises the soft open-file limit to the hard one and says whether it
/// covers `groups` groups of `volumes` volumes. Returns the soft limit in
/// force (None: unlimited).
pub fn raise(groups: usize, volumes: usize) -> Option<u64> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let mut now = current;
    if let Some(target) = raise_to(current, maximum) {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum,
            },
        ) {
            Ok(()) => {
                info!(from = ?current, to = target, "open-file limit raised to the hard limit");
                now = Some(target);
            }
            Err(e) => {
                warn!(soft = ?current, hard = ?maximum, "cannot raise the open-file limit: {e}")
            }
        }
    }
    let need = needed(groups, volumes);
    if let Some(limit) = now.filter(|l| *l < need) {
        warn!(
            limit,
            needed = need,
            groups,
            volumes,
            "the open-file limit is below what this agent's volumes may need: raise the hard limit (LimitNOFILE= in the systemd unit, or ulimit -Hn)"
        );
    }
    now
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_soft_limit_goes_to_the_hard_one() {
        assert_eq!(raise_to(Some(1024), Some(524_288)), Some(524_288));
        assert_eq!(raise_to(Some(1024), None), Some(UNLIMITED_TARGET));
        assert_eq!(raise_to(Some(4096), Some(4096)), None, "there already");
        assert_eq!(raise_to(None, None), None, "unlimited already");
    }

    #[test]
    fn a_thousand_volumes_need_more_than_the_usual_soft_limit() {
        assert!(needed(200, 1000) > 1024);
        assert!(needed(1000, 1000) > 8 * 1000);
        assert!(needed(1, 1) <= 1024, "a small agent fits the default");
    }

    proptest! {
        #[test]
        fn never_lowers_a_limit(current in proptest::option::of(any::<u64>()), maximum in proptest::option::of(any::<u64>())) {
            if let (Some(to), Some(c)) = (raise_to(current, maximum), current) {
                prop_assert!(to > c);
            }
        }

        #[test]
        fn needed_grows_with_volumes_and_never_overflows(g in any::<usize>(), v in any::<usize>()) {
            let n = needed(g, v);
            prop_assert!(n >= BASE);
            prop_assert!(needed(g, v.saturating_add(1)) >= n);
        }
    }
}
