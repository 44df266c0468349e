//! The undo entries of one commit (docs/HISTORY.md, "Commit, with
//! history"): the old content of every range its records change, read
//! from the image or from an earlier record of the same commit, less
//! what an entry after the latest point already saved (H1).

use tandem_volume::RawImage;

use super::entry::{self, EntryHead, MAX_PAYLOAD};
use super::ranges::RangeMap;
use crate::error::ReplicaError;

/// A change about to be applied: `data` for a write, empty otherwise
/// (`zero`: the range becomes zeroes — write zeroes or trim).
pub struct Change<'a> {
    pub epoch: u64,
    pub seq: u64,
    pub volume: u32,
    pub offset: u64,
    pub len: u64,
    pub data: &'a [u8],
    pub zero: bool,
}

/// A point to place after the first `after` changes of the commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointAt {
    pub after: usize,
    pub epoch: u64,
    pub seq: u64,
    pub time_ms: u64,
}

/// Where an entry lies in [`Encoded::bytes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    pub at: usize,
    pub head: EntryHead,
}

/// The encoded entries of a commit.
#[derive(Default)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub entries: Vec<Placed>,
}

impl Encoded {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.entries.clear();
    }

    fn push(&mut self, head: EntryHead, payload: &[u8]) {
        self.entries.push(Placed {
            at: self.bytes.len(),
            head,
        });
        entry::encode(&head, payload, &mut self.bytes);
    }
}

/// Ranges at least this long are read around their holes.
const ASK_HOLES_FROM: u64 = 1 << 20;

/// Where the commit's own changes put a byte: (change index, or None for
/// zeroes; the volume offset the change's data starts at).
type Written = (Option<usize>, u64);

/// Builds the entries of the changes `changes` (in order) with the points
/// `points` (ordered by `after`), reading old data from `images` (by
/// volume index).
pub fn build(
    images: &[&RawImage],
    changes: &[Change<'_>],
    points: &[PointAt],
    out: &mut Encoded,
) -> Result<(), ReplicaError> {
    let mut written: Vec<RangeMap<Written>> = vec![RangeMap::new(); images.len()];
    let mut undone: Vec<RangeMap<()>> = vec![RangeMap::new(); images.len()];
    let mut next_point = points.iter().peekable();
    let mut old = Vec::new();
    for (i, c) in changes.iter().enumerate() {
        while let Some(p) = next_point.next_if(|p| p.after <= i) {
            out.push(point_head(p), &[]);
            undone.iter_mut().for_each(RangeMap::clear);
        }
        let v = c.volume as usize;
        let (Some(image), Some(w), Some(u)) =
            (images.get(v), written.get_mut(v), undone.get_mut(v))
        else {
            return Err(ReplicaError::NoSuchVolume {
                seq: c.seq,
                volume: c.volume,
                volumes: images.len(),
            });
        };
        let end = c.offset.saturating_add(c.len);
        for (gs, ge) in u.gaps(c.offset, end) {
            let mut at = gs;
            while at < ge {
                let n = (ge - at).min(MAX_PAYLOAD as u64);
                let zero = old_content(image, w, changes, at, n, &mut old)?;
                let head = EntryHead::Undo {
                    volume: c.volume,
                    offset: at,
                    len: n,
                    zero,
                    epoch: c.epoch,
                    seq: c.seq,
                };
                out.push(head, if zero { &[] } else { &old });
                at += n;
            }
            u.fill(gs, ge, ());
        }
        w.overwrite(
            c.offset,
            end,
            (if c.zero { None } else { Some(i) }, c.offset),
        );
    }
    for p in next_point {
        out.push(point_head(p), &[]);
    }
    Ok(())
}

fn point_head(p: &PointAt) -> EntryHead {
    EntryHead::Point {
        epoch: p.epoch,
        seq: p.seq,
        time_ms: p.time_ms,
    }
}

/// Reads what `[at, at + n)` holds before the commit's next change: true
/// when it is all zeroes (nothing in `old`), else the bytes in `old`.
// Offsets within one piece (at most MAX_PAYLOAD) or one record (at most
// one peer payload) fit a usize.
#[allow(clippy::cast_possible_truncation)]
fn old_content(
    image: &RawImage,
    written: &RangeMap<Written>,
    changes: &[Change<'_>],
    at: u64,
    n: u64,
    old: &mut Vec<u8>,
) -> Result<bool, ReplicaError> {
    let end = at + n;
    let from_batch = written.covered(at, end);
    let gaps = written.gaps(at, end);
    // Parts the image gives, skipping holes (a trim of a large sparse
    // range costs no reading). A short range is read as it is (a hole
    // reads as zeroes): asking the file system where its holes are costs
    // more than reading it (on tmpfs, a walk of the file's pages).
    let mut image_parts = Vec::new();
    for (s, e) in gaps {
        if e - s < ASK_HOLES_FROM {
            image_parts.push((s, e));
            continue;
        }
        let mut pos = s;
        for (run, hole) in image.extents(s, e - s, 4096)? {
            let stop = (pos + run).min(e);
            if !hole {
                image_parts.push((pos, stop));
            }
            pos = stop;
        }
        if pos < e {
            // Past what the map reported: read it.
            image_parts.push((pos, e));
        }
    }
    let any_batch_data = from_batch.iter().any(|(_, _, (c, _), _)| c.is_some());
    if image_parts.is_empty() && !any_batch_data {
        return Ok(true);
    }
    old.clear();
    // At most MAX_PAYLOAD (n is bounded by the caller).
    old.resize(usize::try_from(n).unwrap_or(MAX_PAYLOAD), 0);
    for (s, e) in image_parts {
        let (a, b) = ((s - at) as usize, (e - at) as usize);
        image.read(s, &mut old[a..b])?;
    }
    for (s, e, (change, origin), _) in from_batch {
        let (a, b) = ((s - at) as usize, (e - at) as usize);
        match change.and_then(|i| changes.get(i)) {
            Some(c) => {
                let (x, y) = ((s - origin) as usize, (e - origin) as usize);
                match c.data.get(x..y) {
                    Some(src) => old[a..b].copy_from_slice(src),
                    None => old[a..b].fill(0),
                }
            }
            None => old[a..b].fill(0),
        }
    }
    Ok(old.iter().all(|b| *b == 0))
}
