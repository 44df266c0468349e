//! When the primary marks recovery points (docs/HISTORY.md, "Points";
//! docs/PEER.md, "Marks"), without I/O: the shipper tells the [`Marker`]
//! of each record it sends and of the resyncs it runs, and sends the
//! `Mark` it is given right after the record; the replica's session
//! checks marks against the same rules ([`MarkRule`]).
//!
//! A record is marked when it is a FLUSH or carries FUA; otherwise when
//! its capture time is [`MARK_EVERY`] or more after the last mark's, so a
//! stream without flushes gets at least one mark per second of capture
//! time; and when the stream goes idle, its last record is marked once
//! [`MARK_EVERY`] has passed since it was captured (at once for a backlog
//! caught up). Records the replica's images are not a consistent prefix
//! at — those of a resync that has not reached its consistent point —
//! are never marked.
//!
//! Per record this costs a comparison or two: no clock is read (the
//! record carries its capture instant) and nothing is allocated.

use std::time::{Duration, Instant, SystemTime};

/// A stream without flushes is marked at least this often (capture
/// time); an idle stream's last record at most this long after its
/// capture.
pub const MARK_EVERY: Duration = Duration::from_secs(1);

/// A mark to send: the record `seq`, captured at `at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkAt {
    pub seq: u64,
    pub at: Instant,
}

/// Which records a mark may name, as both sides judge it: every record
/// from `from` on (none while a resync has not reached its consistent
/// point).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkRule {
    from: u64,
}

impl MarkRule {
    /// A session that opens on a consistent replica (the stream goes on
    /// from its records) may mark any record; otherwise none until a
    /// resync ends.
    pub fn opening(consistent: bool) -> MarkRule {
        MarkRule {
            from: if consistent { 0 } else { u64::MAX },
        }
    }

    /// A resync began: the images are no prefix until it ends.
    pub fn resync_begins(&mut self) {
        self.from = u64::MAX;
    }

    /// A resync part ended: the images are a prefix again at
    /// `consistent_at - 1` and after (never, for a part that more parts
    /// follow: `consistent_at` = [`tandem_peer::NOT_YET_CONSISTENT`]).
    pub fn resync_ends(&mut self, consistent_at: u64) {
        self.from = if consistent_at == tandem_peer::NOT_YET_CONSISTENT {
            u64::MAX
        } else {
            consistent_at.saturating_sub(1)
        };
    }

    /// Whether the record `seq` is a consistent point.
    pub fn allows(&self, seq: u64) -> bool {
        seq >= self.from && self.from != u64::MAX
    }

    /// The first record a mark may name (`u64::MAX`: none).
    pub fn from(&self) -> u64 {
        self.from
    }
}

/// The primary's side: which records of a session to mark.
#[derive(Clone, Debug)]
pub struct Marker {
    rule: MarkRule,
    /// The capture time of the last mark in this session.
    last_mark: Option<Instant>,
    /// The last record sent, if it is not marked.
    pending: Option<MarkAt>,
    /// The last record the replica holds or was sent, as far as this
    /// session knows (0: not known).
    last_sent: u64,
}

impl Marker {
    /// A session's marker; `consistent`: the session streams to a replica
    /// that is a consistent prefix ([`MarkRule::opening`]).
    pub fn new(consistent: bool) -> Marker {
        Marker {
            rule: MarkRule::opening(consistent),
            last_mark: None,
            pending: None,
            last_sent: 0,
        }
    }

    /// The record `seq`, captured at `at`, was sent; `point`: it is a
    /// FLUSH or carries FUA. Returns the mark to send right after it.
    pub fn sent(&mut self, seq: u64, at: Instant, point: bool) -> Option<MarkAt> {
        self.last_sent = seq;
        if !self.rule.allows(seq) {
            self.pending = None;
            return None;
        }
        let due = point
            || self
                .last_mark
                .is_none_or(|last| at.saturating_duration_since(last) >= MARK_EVERY);
        let record = MarkAt { seq, at };
        if due {
            self.pending = None;
            self.last_mark = Some(at);
            Some(record)
        } else {
            self.pending = Some(record);
            None
        }
    }

    /// Nothing is left to send at `now`: the last record sent, if it is
    /// not marked and [`MARK_EVERY`] has passed since its capture.
    pub fn idle(&mut self, now: Instant) -> Option<MarkAt> {
        let pending = self.pending?;
        if now.saturating_duration_since(pending.at) < MARK_EVERY {
            return None;
        }
        self.pending = None;
        self.last_mark = Some(pending.at);
        Some(pending)
    }

    /// When [`Marker::idle`] will have a mark, if records stay idle.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending.map(|p| p.at + MARK_EVERY)
    }

    /// A resync began, resuming the stream at `resume_at` (the replica
    /// holds the records below it once the resync is over): nothing is
    /// marked until it ends at a consistent point.
    pub fn resync_begins(&mut self, resume_at: u64) {
        self.rule.resync_begins();
        self.pending = None;
        self.last_mark = None;
        self.last_sent = resume_at.saturating_sub(1);
    }

    /// A resync part ended with `consistent_at`, at `now`. When every
    /// record below it was sent already, the images are a prefix at
    /// `consistent_at - 1` (captured by now) as soon as they are applied:
    /// that point is marked once the stream is idle, unless a later
    /// record is sent first, so a group quiet after its resync still gets
    /// a point.
    pub fn resync_ends(&mut self, consistent_at: u64, now: Instant) {
        self.rule.resync_ends(consistent_at);
        let seq = consistent_at.saturating_sub(1);
        if self.rule.allows(seq) && seq > 0 && self.last_sent == seq {
            self.pending = Some(MarkAt { seq, at: now });
        }
    }
}

/// Capture instants as the primary's wall-clock time: one reading of both
/// clocks, taken when a session starts, maps every instant after (or
/// before) it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WallClock {
    base: Instant,
    /// Nanoseconds since the Unix epoch at `base`.
    base_nanos: u128,
}

impl WallClock {
    /// `wall` and `base` read at the same moment.
    pub fn new(wall: SystemTime, base: Instant) -> WallClock {
        let base_nanos = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        WallClock { base, base_nanos }
    }

    /// Reads both clocks now.
    pub fn now() -> WallClock {
        WallClock::new(SystemTime::now(), Instant::now())
    }

    /// `at` in milliseconds since the Unix epoch (0 for an instant before
    /// it).
    pub fn ms(&self, at: Instant) -> u64 {
        let nanos = if at >= self.base {
            self.base_nanos.saturating_add((at - self.base).as_nanos())
        } else {
            self.base_nanos.saturating_sub((self.base - at).as_nanos())
        };
        u64::try_from(nanos / 1_000_000).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn flushes_and_fua_are_marked_at_once() {
        let t = Instant::now();
        let mut m = Marker::new(true);
        // The first record of a session is marked.
        assert_eq!(m.sent(1, t, false), Some(MarkAt { seq: 1, at: t }));
        assert_eq!(m.sent(2, t + ms(1), false), None);
        assert_eq!(
            m.sent(3, t + ms(2), true),
            Some(MarkAt {
                seq: 3,
                at: t + ms(2)
            })
        );
        // Marked: nothing pending any more.
        assert_eq!(m.deadline(), None);
        assert_eq!(m.idle(t + ms(5000)), None);
    }

    #[test]
    fn a_stream_without_flushes_is_marked_every_second() {
        let t = Instant::now();
        let mut m = Marker::new(true);
        let mut marks = Vec::new();
        for i in 0..500u64 {
            if let Some(mark) = m.sent(i + 1, t + ms(i * 10), false) {
                marks.push(mark.seq);
            }
        }
        // Records every 10 ms for 5 s: seqs 1, 101, 201, 301, 401.
        assert_eq!(marks, [1, 101, 201, 301, 401]);
    }

    #[test]
    fn an_idle_stream_marks_its_last_record_within_a_second() {
        let t = Instant::now();
        let mut m = Marker::new(true);
        assert!(m.sent(1, t, false).is_some());
        assert_eq!(m.sent(2, t + ms(300), false), None);
        assert_eq!(m.deadline(), Some(t + ms(1300)));
        assert_eq!(m.idle(t + ms(400)), None);
        assert_eq!(m.idle(t + ms(1299)), None);
        assert_eq!(
            m.idle(t + ms(1300)),
            Some(MarkAt {
                seq: 2,
                at: t + ms(300)
            })
        );
        assert_eq!((m.idle(t + ms(9000)), m.deadline()), (None, None));
        // The next record is less than a second after that mark.
        assert_eq!(m.sent(3, t + ms(900), false), None);
        // A backlog sent long after its capture is marked as soon as the
        // stream is idle.
        assert_eq!(
            m.idle(t + ms(900)),
            None,
            "not yet a second after its capture"
        );
        assert_eq!(m.idle(t + ms(60_000)).map(|m| m.seq), Some(3));
    }

    #[test]
    fn resyncs_mark_nothing_until_their_consistent_point() {
        let t = Instant::now();
        let mut m = Marker::new(true);
        assert_eq!(m.sent(1, t, false).map(|m| m.seq), Some(1));
        assert_eq!(m.sent(2, t, false), None);
        m.resync_begins(3);
        // The pending record of before the resync is forgotten.
        assert_eq!((m.idle(t + ms(5000)), m.deadline()), (None, None));
        // A part that more parts follow leaves nothing markable.
        m.resync_ends(tandem_peer::NOT_YET_CONSISTENT, t);
        assert_eq!(m.sent(10, t, true), None);
        m.resync_begins(11);
        m.resync_ends(20, t);
        // Records below 19 are of the resync's catch-up: no prefix.
        assert_eq!(m.sent(11, t, true), None);
        assert_eq!(m.sent(18, t + ms(2000), true), None);
        assert_eq!(m.sent(19, t + ms(2001), false).map(|m| m.seq), Some(19));
        assert_eq!(m.sent(20, t + ms(2002), true).map(|m| m.seq), Some(20));
    }

    #[test]
    fn a_session_on_an_inconsistent_replica_marks_after_its_resync() {
        let t = Instant::now();
        let mut m = Marker::new(false);
        assert_eq!(m.sent(5, t, true), None);
        m.resync_begins(6);
        m.resync_ends(6, t);
        assert_eq!(m.sent(6, t, false).map(|m| m.seq), Some(6));
    }

    /// A resync that ends with every record below its consistent point
    /// sent (an idle group's first sync) marks that point once idle.
    #[test]
    fn a_quiet_resync_end_is_marked_once_idle() {
        let t = Instant::now();
        let mut m = Marker::new(false);
        m.resync_begins(8);
        m.resync_ends(8, t);
        assert_eq!(m.idle(t + ms(500)), None);
        assert_eq!(m.idle(t + ms(1000)).map(|m| m.seq), Some(7));
        // Records still to come: nothing is marked before they are sent.
        let mut m = Marker::new(false);
        m.resync_begins(8);
        m.resync_ends(12, t);
        assert_eq!(m.idle(t + ms(5000)), None);
        assert_eq!(m.sent(11, t, false).map(|m| m.seq), Some(11));
    }

    #[test]
    fn rule() {
        let mut r = MarkRule::opening(true);
        assert!(r.allows(0) && r.allows(u64::MAX - 1));
        r.resync_begins();
        assert!(!r.allows(5) && !r.allows(u64::MAX));
        r.resync_ends(1);
        assert!(r.allows(0));
        r.resync_ends(0);
        assert!(r.allows(0));
        r.resync_ends(tandem_peer::NOT_YET_CONSISTENT);
        assert!(!r.allows(u64::MAX));
        assert!(!MarkRule::opening(false).allows(7));
    }

    #[test]
    fn wall_clock() {
        let base = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let c = WallClock::new(wall, base);
        assert_eq!(c.ms(base), 1_700_000_000_000);
        assert_eq!(c.ms(base + ms(1500)), 1_700_000_001_500);
        assert_eq!(c.ms(base + Duration::from_micros(999)), 1_700_000_000_000);
        // Instants before the reading (records captured before the
        // session started) map back.
        if let Some(before) = base.checked_sub(ms(250)) {
            assert_eq!(c.ms(before), 1_699_999_999_750);
        }
        // A clock before the epoch reads as 0.
        let early = WallClock::new(SystemTime::UNIX_EPOCH - ms(5), base);
        assert_eq!(early.ms(base), 0);
        // The real clocks agree with SystemTime within a second.
        let now = WallClock::now().ms(Instant::now());
        let sys = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        assert!(u128::from(now).abs_diff(sys) < 1000, "{now} vs {sys}");
    }

    proptest! {
        /// Over any stream of records (gaps, flushes, idle periods,
        /// resyncs): marks name records sent, in increasing order, never
        /// below the consistent point; every FLUSH/FUA at or past it is
        /// marked at once; no record at or past it stays unmarked for
        /// more than a second of capture time while records keep coming,
        /// or past its idle deadline.
        #[test]
        fn marks_cover_the_stream(
            steps in prop::collection::vec((0u64..1500, any::<bool>(), 0u8..20), 1..300)
        ) {
            let t0 = Instant::now();
            let mut m = Marker::new(true);
            let mut rule = MarkRule::opening(true);
            let mut seq = 0u64;
            let mut now = t0;
            let mut last_mark_seq = 0u64;
            let mut last_mark_at: Option<Instant> = None;
            // The oldest record since the last mark that could have been
            // marked (at or past the consistent point).
            let mut unmarked_since: Option<Instant> = None;
            for (gap, point, what) in steps {
                now += ms(gap);
                match what {
                    0 => {
                        m.resync_begins(seq + 1);
                        rule.resync_begins();
                        unmarked_since = None;
                        last_mark_at = None;
                        let consistent_at = seq + 1 + u64::from(point) * 3;
                        m.resync_ends(consistent_at, now);
                        rule.resync_ends(consistent_at);
                        if consistent_at == seq + 1 && seq > 0 {
                            // Every record below it was sent: its point
                            // is due once idle.
                            unmarked_since = Some(now);
                        }
                        continue;
                    }
                    1 => {
                        if let Some(mark) = m.idle(now) {
                            prop_assert_eq!(mark.seq, seq, "idle marks the last record sent");
                            prop_assert!(now >= mark.at + MARK_EVERY);
                            last_mark_seq = mark.seq;
                            last_mark_at = Some(mark.at);
                            unmarked_since = None;
                        } else if let Some(since) = unmarked_since {
                            prop_assert!(now < m.deadline().unwrap());
                            prop_assert!(since <= now);
                        }
                        continue;
                    }
                    _ => {}
                }
                seq += 1;
                let mark = m.sent(seq, now, point);
                if let Some(mark) = mark {
                    prop_assert_eq!(mark.seq, seq);
                    prop_assert!(mark.seq > last_mark_seq || last_mark_seq == 0);
                    prop_assert!(rule.allows(mark.seq));
                    last_mark_seq = mark.seq;
                    last_mark_at = Some(mark.at);
                    unmarked_since = None;
                } else if rule.allows(seq) {
                    prop_assert!(!point, "a flush at a consistent point is marked");
                    let last = last_mark_at.expect("the first markable record is marked");
                    prop_assert!(now.duration_since(last) < MARK_EVERY);
                    unmarked_since.get_or_insert(now);
                }
            }
        }
    }
}
