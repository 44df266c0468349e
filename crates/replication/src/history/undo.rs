//! The undo entries of one commit (docs/HISTORY.md, "Commit, with
//! history"): the old content of every range its records change, read
//! from the image or from an earlier record of the same commit, less
//! what an entry after the latest point already saved (H1).

use tandem_volume::RawImage;

use super::entry::{self, EntryHead, HEADER_LEN, MAX_PAYLOAD};
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
    /// What [`build`] works with, kept from one commit to the next so
    /// that a change allocates nothing.
    scratch: Scratch,
}

impl Encoded {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.entries.clear();
    }
}

/// [`build`]'s working state, reset by each call (the vectors keep their
/// allocations).
#[derive(Default)]
struct Scratch {
    /// Per volume: where the commit's changes so far put each byte.
    written: Vec<RangeMap<Written>>,
    /// The pieces of `written` a change meets.
    pieces: Vec<Piece>,
    /// The parts of a change no entry since the latest point saved yet.
    gaps: Vec<(u64, u64)>,
    /// The parts of a piece of old data the image gives.
    image_parts: Vec<(u64, u64)>,
}

/// Ranges at least this long are read around their holes.
const ASK_HOLES_FROM: u64 = 1 << 20;

/// Where the commit's own changes put a byte: (index of the last change
/// to it; the volume offset that change starts at).
type Written = (usize, u64);

/// A piece of `written`: (start, end, value, start of its interval).
type Piece = (u64, u64, Written, u64);

/// Builds the entries of the changes `changes` (in order) with the points
/// `points` (ordered by `after`), reading old data from `images` (by
/// volume index), after what `out` holds.
///
/// A byte is saved at most once after a point (H1): once a change since
/// the latest point wrote it, the entry of that change already covers
/// it. So the bytes already saved are those whose last change is at or
/// after the latest point, and one map per volume says both that and
/// where in the commit's changes the older bytes are.
pub fn build(
    images: &[&RawImage],
    changes: &[Change<'_>],
    points: &[PointAt],
    out: &mut Encoded,
) -> Result<(), ReplicaError> {
    let Encoded {
        bytes,
        entries,
        scratch,
    } = out;
    let Scratch {
        written,
        pieces,
        gaps,
        image_parts,
    } = scratch;
    written.iter_mut().for_each(RangeMap::clear);
    written.resize_with(images.len(), RangeMap::new);
    let mut out = Out { bytes, entries };
    // The first change after the latest point.
    let mut since = 0;
    let mut next_point = points.iter().peekable();
    for (i, c) in changes.iter().enumerate() {
        while let Some(p) = next_point.next_if(|p| p.after <= i) {
            out.push(point_head(p), &[]);
            since = i;
        }
        let v = c.volume as usize;
        let (Some(image), Some(w)) = (images.get(v), written.get_mut(v)) else {
            return Err(ReplicaError::NoSuchVolume {
                seq: c.seq,
                volume: c.volume,
                volumes: images.len(),
            });
        };
        let end = c.offset.saturating_add(c.len);
        let old = Old {
            image,
            changes,
            change: c,
        };
        let value = (i, c.offset);
        if w.touches(c.offset, end) {
            w.covered_into(c.offset, end, pieces);
            // Bytes written since the latest point are saved already.
            gaps.clear();
            let mut at = c.offset;
            for &(s, e, (j, _), _) in pieces.iter() {
                if j >= since {
                    if s > at {
                        gaps.push((at, s));
                    }
                    at = e;
                }
            }
            if at < end {
                gaps.push((at, end));
            }
            for &(gs, ge) in gaps.iter() {
                old.save(gs, ge, pieces, image_parts, &mut out)?;
            }
            w.overwrite(c.offset, end, value);
        } else {
            // The common case: all of it from the image, one insertion.
            old.save(c.offset, end, &[], image_parts, &mut out)?;
            w.insert_apart(c.offset, end, value);
        }
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

/// Where entries go.
struct Out<'a> {
    bytes: &'a mut Vec<u8>,
    entries: &'a mut Vec<Placed>,
}

impl Out<'_> {
    fn push(&mut self, head: EntryHead, payload: &[u8]) {
        self.entries.push(Placed {
            at: self.bytes.len(),
            head,
        });
        entry::encode(&head, payload, self.bytes);
    }
}

/// The old content of the bytes one change is about to overwrite.
struct Old<'a, 'c> {
    image: &'a RawImage,
    changes: &'a [Change<'c>],
    change: &'a Change<'c>,
}

impl Old<'_, '_> {
    /// Saves `[start, end)`, not yet saved since the latest point, in
    /// entries of at most MAX_PAYLOAD bytes. `batch`: pieces of the
    /// commit's earlier changes, in order, whichever of them meet it
    /// (they hold its bytes there; the image holds the rest).
    fn save(
        &self,
        start: u64,
        end: u64,
        batch: &[Piece],
        image_parts: &mut Vec<(u64, u64)>,
        out: &mut Out<'_>,
    ) -> Result<(), ReplicaError> {
        let mut at = start;
        while at < end {
            let n = (end - at).min(MAX_PAYLOAD as u64);
            // The pieces that meet `[at, at + n)`.
            let first = batch.partition_point(|p| p.1 <= at);
            let last = batch.partition_point(|p| p.0 < at + n);
            let meets = batch.get(first..last).unwrap_or_default();
            let entry_at = out.bytes.len();
            let saved = self.save_piece(at, n, meets, image_parts, out);
            if saved.is_err() {
                out.bytes.truncate(entry_at);
            }
            saved?;
            at += n;
        }
        Ok(())
    }

    /// Saves `[at, at + n)` (n at most MAX_PAYLOAD) in one entry, built
    /// in place at the end of `out`: a data entry, or a zero entry when
    /// the old content is all zeroes.
    // Offsets within one piece (at most MAX_PAYLOAD) or one record (at
    // most one peer payload) fit a usize.
    #[allow(clippy::cast_possible_truncation)]
    fn save_piece(
        &self,
        at: u64,
        n: u64,
        batch: &[Piece],
        image_parts: &mut Vec<(u64, u64)>,
        out: &mut Out<'_>,
    ) -> Result<(), ReplicaError> {
        let end = at + n;
        let c = self.change;
        let head = |zero| EntryHead::Undo {
            volume: c.volume,
            offset: at,
            len: n,
            zero,
            epoch: c.epoch,
            seq: c.seq,
        };
        // Parts the image gives, skipping holes (a trim of a large sparse
        // range costs no reading). A short range is read as it is (a hole
        // reads as zeroes): asking the file system where its holes are
        // costs more than reading it (on tmpfs, a walk of the file's
        // pages).
        image_parts.clear();
        let mut any_batch_data = false;
        let mut pos = at;
        for &(s, e, (j, _), _) in batch {
            let (s, e) = (s.max(at), e.min(end));
            if s > pos {
                self.image_part(pos, s, image_parts)?;
            }
            any_batch_data |= self.changes.get(j).is_some_and(|b| !b.zero);
            pos = e;
        }
        if pos < end {
            self.image_part(pos, end, image_parts)?;
        }
        if image_parts.is_empty() && !any_batch_data {
            out.push(head(true), &[]);
            return Ok(());
        }
        let start = entry::begin(out.bytes);
        // Zeroes: holes and zeroed ranges stay so.
        out.bytes.resize(start + HEADER_LEN + n as usize, 0);
        let old = &mut out.bytes[start + HEADER_LEN..];
        for &(s, e) in image_parts.iter() {
            let (a, b) = ((s - at) as usize, (e - at) as usize);
            self.image.read(s, &mut old[a..b])?;
        }
        for &(s, e, (j, origin), _) in batch {
            let (s, e) = (s.max(at), e.min(end));
            let Some(c) = self.changes.get(j).filter(|c| !c.zero) else {
                continue;
            };
            let (a, b) = ((s - at) as usize, (e - at) as usize);
            let (x, y) = ((s - origin) as usize, (e - origin) as usize);
            if let Some(src) = c.data.get(x..y) {
                old[a..b].copy_from_slice(src);
            }
        }
        if tandem_peer::is_zero(old) {
            out.bytes.truncate(start);
            out.push(head(true), &[]);
        } else {
            let head = head(false);
            entry::seal(&head, start, out.bytes);
            out.entries.push(Placed { at: start, head });
        }
        Ok(())
    }

    /// Adds what the image gives of `[s, e)` to `parts`.
    fn image_part(&self, s: u64, e: u64, parts: &mut Vec<(u64, u64)>) -> Result<(), ReplicaError> {
        if e - s < ASK_HOLES_FROM {
            parts.push((s, e));
            return Ok(());
        }
        let mut pos = s;
        for (run, hole) in self.image.extents(s, e - s, 4096)? {
            let stop = (pos + run).min(e);
            if !hole {
                parts.push((pos, stop));
            }
            pos = stop;
        }
        if pos < e {
            // Past what the map reported: read it.
            parts.push((pos, e));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // small test values
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Past MAX_PAYLOAD and ASK_HOLES_FROM with room to spare.
    const SIZE: u64 = 12 << 20;
    const VOLUMES: usize = 2;

    #[derive(Clone, Copy, Debug)]
    struct Op {
        volume: u32,
        offset: u64,
        len: u64,
        /// None: zeroes; else the data's pattern.
        data: Option<u8>,
    }

    /// Data of `len` bytes: all zeroes, zeroes but the last byte, or
    /// mostly not zero.
    fn pattern(seed: u8, len: u64) -> Vec<u8> {
        let mut d = vec![0u8; len as usize];
        match seed % 4 {
            0 => {}
            1 => {
                if let Some(last) = d.last_mut() {
                    *last = seed;
                }
            }
            _ => {
                for (i, b) in d.iter_mut().enumerate() {
                    *b = (i as u8).wrapping_mul(7).wrapping_add(seed) ^ (i >> 9) as u8;
                }
            }
        }
        d
    }

    fn op() -> impl Strategy<Value = Op> {
        let data = prop_oneof![Just(None), any::<u8>().prop_map(Some)];
        let volume = 0..VOLUMES as u32;
        prop_oneof![
            // Small changes crowded together: overlapping, adjacent.
            8 => (volume.clone(), 0u64..128, 0u64..64, 0u64..512, data.clone())
                .prop_map(|(volume, at, sectors, odd, data)| Op {
                    volume,
                    offset: at * 512 + if odd % 4 == 0 { odd } else { 0 },
                    len: sectors * 512 + if odd % 3 == 0 { odd } else { 0 },
                    data,
                }),
            // Large ones over them: holes asked for, entries cut at
            // MAX_PAYLOAD.
            1 => (volume, 0u64..(2 << 20), (1u64 << 20)..(10 << 20), data).prop_map(
                |(volume, offset, len, data)| Op {
                    volume,
                    offset,
                    len,
                    data,
                }
            ),
        ]
    }

    /// One commit: its changes and where its points are.
    fn commit() -> impl Strategy<Value = (Vec<Op>, Vec<usize>)> {
        prop::collection::vec(op(), 0..24).prop_flat_map(|ops| {
            let n = ops.len();
            (Just(ops), prop::collection::vec(0..=n, 0..4)).prop_map(|(ops, mut points)| {
                points.sort_unstable();
                (ops, points)
            })
        })
    }

    fn push(out: &mut Encoded, head: EntryHead, payload: &[u8]) {
        out.entries.push(Placed {
            at: out.bytes.len(),
            head,
        });
        entry::encode(&head, payload, &mut out.bytes);
    }

    /// The model, a byte at a time: for each change, each byte not saved
    /// since the latest point is saved with what it holds before the
    /// change (`images`: the volumes' content before the commit; returned
    /// as it is after it).
    fn model(
        mut images: Vec<Vec<u8>>,
        changes: &[Change<'_>],
        points: &[PointAt],
    ) -> (Encoded, Vec<Vec<u8>>) {
        let mut out = Encoded::default();
        let mut saved = vec![vec![false; SIZE as usize]; VOLUMES];
        let mut next = points.iter().peekable();
        for (i, c) in changes.iter().enumerate() {
            while let Some(p) = next.next_if(|p| p.after <= i) {
                push(&mut out, point_head(p), &[]);
                saved.iter_mut().for_each(|s| s.fill(false));
            }
            let v = c.volume as usize;
            let (start, end) = (c.offset as usize, (c.offset + c.len) as usize);
            let mut b = start;
            while b < end {
                if saved[v][b] {
                    b += 1;
                    continue;
                }
                let mut e = b;
                while e < end && !saved[v][e] {
                    e += 1;
                }
                for at in (b..e).step_by(MAX_PAYLOAD) {
                    let n = (e - at).min(MAX_PAYLOAD);
                    let old = &images[v][at..at + n];
                    let zero = old.iter().all(|x| *x == 0);
                    let head = EntryHead::Undo {
                        volume: c.volume,
                        offset: at as u64,
                        len: n as u64,
                        zero,
                        epoch: c.epoch,
                        seq: c.seq,
                    };
                    push(&mut out, head, if zero { &[] } else { old });
                }
                b = e;
            }
            saved[v][start..end].fill(true);
            if c.zero {
                images[v][start..end].fill(0);
            } else {
                images[v][start..end].copy_from_slice(c.data);
            }
        }
        for p in next {
            push(&mut out, point_head(p), &[]);
        }
        (out, images)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// `build` saves exactly what the byte model does, commit after
        /// commit (its working state reused), over images with data,
        /// allocated zeroes and holes.
        #[test]
        fn build_saves_what_the_byte_model_does(
            before in prop::collection::vec(op(), 0..6),
            commits in prop::collection::vec(commit(), 1..4),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let images: Vec<RawImage> = (0..VOLUMES)
                .map(|v| RawImage::open_or_create(&dir.path().join(format!("v{v}")), SIZE).unwrap())
                .collect();
            let refs: Vec<&RawImage> = images.iter().collect();
            let image = |o: &Op| &images[o.volume as usize];
            for o in before.iter().filter(|o| o.len > 0) {
                // Allocated zeroes, not holes, where the data is zeroes.
                image(o).write(o.offset, &pattern(o.data.unwrap_or(0), o.len)).unwrap();
            }
            let mut content: Vec<Vec<u8>> = (0..VOLUMES)
                .map(|v| std::fs::read(dir.path().join(format!("v{v}"))).unwrap())
                .collect();
            let mut enc = Encoded::default();
            let mut seq = 0;
            for (ops, afters) in &commits {
                let data: Vec<Vec<u8>> = ops
                    .iter()
                    .map(|o| o.data.map(|s| pattern(s, o.len)).unwrap_or_default())
                    .collect();
                let changes: Vec<Change<'_>> = ops
                    .iter()
                    .zip(&data)
                    .enumerate()
                    .map(|(i, (o, d))| Change {
                        epoch: 3,
                        seq: seq + i as u64 + 1,
                        volume: o.volume,
                        offset: o.offset,
                        len: o.len,
                        data: d,
                        zero: o.data.is_none(),
                    })
                    .collect();
                let points: Vec<PointAt> = afters
                    .iter()
                    .map(|&after| PointAt {
                        after,
                        epoch: 3,
                        seq: seq + after as u64,
                        time_ms: 1000 + after as u64,
                    })
                    .collect();
                enc.clear();
                build(&refs, &changes, &points, &mut enc).unwrap();
                let (want, after) = model(content, &changes, &points);
                prop_assert_eq!(&enc.entries, &want.entries);
                let differ = enc.bytes.iter().zip(&want.bytes).position(|(a, b)| a != b);
                prop_assert!(
                    enc.bytes.len() == want.bytes.len() && differ.is_none(),
                    "{} bytes, {} wanted, first difference at {:?}",
                    enc.bytes.len(),
                    want.bytes.len(),
                    differ
                );
                for (o, d) in ops.iter().zip(&data).filter(|(o, _)| o.len > 0) {
                    match o.data {
                        Some(_) => image(o).write(o.offset, d).unwrap(),
                        None => image(o).write_zeroes(o.offset, o.len, false, false).unwrap(),
                    }
                }
                content = after;
                seq += ops.len() as u64;
            }
        }
    }

    #[test]
    fn a_change_to_a_volume_past_the_images_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let image = RawImage::open_or_create(&dir.path().join("v0"), 1 << 20).unwrap();
        let change = Change {
            epoch: 1,
            seq: 5,
            volume: 1,
            offset: 0,
            len: 512,
            data: &[1; 512],
            zero: false,
        };
        let mut enc = Encoded::default();
        let err = build(&[&image], &[change], &[], &mut enc).unwrap_err();
        assert!(matches!(
            err,
            ReplicaError::NoSuchVolume {
                seq: 5,
                volume: 1,
                volumes: 1
            }
        ));
    }
}
