//! How ZeRO splits a flat vector (weights, gradients, Adam's moments) over the ranks: the vector
//! is cut into segments, and each segment into one equal part per rank (the last parts padded
//! with zeros on the wire); a rank keeps part `r` of every segment, concatenated. ZeRO-1 uses one
//! segment, the whole vector; ZeRO-2 and -3 use the network's pieces, so that one piece's
//! gradients are reduce-scattered, and one piece's weights all-gathered, by themselves.

use std::ops::Range;

use super::Collective;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    segments: Vec<Range<usize>>,
    rank: usize,
    ranks: usize,
}

impl Partition {
    /// `segments` (contiguous, in order) split over `ranks`; this rank is `rank`.
    pub fn new(segments: Vec<Range<usize>>, rank: usize, ranks: usize) -> Self {
        assert!(rank < ranks, "rank {rank} of {ranks}");
        Self { segments, rank, ranks }
    }

    /// One segment: the whole vector of `total`.
    pub fn whole(total: usize, rank: usize, ranks: usize) -> Self {
        Self::new(std::iter::once(0..total).collect(), rank, ranks)
    }

    /// The flat vector of one rank: everything.
    pub fn replicated(total: usize) -> Self {
        Self::whole(total, 0, 1)
    }

    pub fn segments(&self) -> &[Range<usize>] {
        &self.segments
    }

    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// The length of each rank's part of segment `s` (padded).
    fn part(&self, s: usize) -> usize {
        self.segments[s].len().div_ceil(self.ranks)
    }

    /// Rank `rank`'s part of segment `s`, in the flat vector.
    fn range_of(&self, s: usize, rank: usize) -> Range<usize> {
        let (seg, part) = (&self.segments[s], self.part(s));
        (seg.start + rank * part).min(seg.end)..(seg.start + (rank + 1) * part).min(seg.end)
    }

    /// This rank's ranges of the flat vector, in order.
    pub fn mine(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        (0..self.segments.len()).map(|s| self.range_of(s, self.rank))
    }

    /// The length of this rank's shard.
    pub fn len(&self) -> usize {
        self.mine().map(|r| r.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where segment `s`'s part starts in this rank's shard, and its length.
    pub fn in_shard(&self, s: usize) -> Range<usize> {
        let start: usize = (0..s).map(|i| self.range_of(i, self.rank).len()).sum();
        start..start + self.range_of(s, self.rank).len()
    }

    /// This rank's shard of a full vector.
    pub fn take(&self, full: &[f32]) -> Vec<f32> {
        self.mine().flat_map(|r| full[r].iter().copied()).collect()
    }

    /// Segment `s` reduced over the ranks: every rank passes its values of the whole segment,
    /// `into` (this rank's part of it in the shard, [`Self::in_shard`]) gets the sum added.
    pub fn reduce_scatter_add(&self, comm: &dyn Collective, s: usize, segment: &[f32], into: &mut [f32]) {
        assert_eq!(segment.len(), self.segments[s].len(), "reduce-scatter of segment {s}: wrong length");
        let part = self.part(s);
        let mut send = segment.to_vec();
        send.resize(part * self.ranks, 0.0);
        let mut mine = vec![0f32; part];
        comm.reduce_scatter_sum(&send, &mut mine);
        into.iter_mut().zip(&mine).for_each(|(a, &v)| *a += v);
    }

    /// Segment `s` whole on every rank, from each rank's part (`mine`, its slice of the shard).
    pub fn all_gather(&self, comm: &dyn Collective, s: usize, mine: &[f32]) -> Vec<f32> {
        let part = self.part(s);
        let mut send = mine.to_vec();
        send.resize(part, 0.0);
        let mut all = vec![0f32; part * self.ranks];
        comm.all_gather(&send, &mut all);
        all.truncate(self.segments[s].len());
        all
    }

    /// The full vector on rank 0 (`None` elsewhere), from every rank's shard.
    pub fn gather_to_root(&self, comm: &dyn Collective, shard: &[f32]) -> Option<Vec<f32>> {
        if self.ranks == 1 {
            return Some(shard.to_vec());
        }
        // One call: every rank sends its padded parts of all segments.
        let padded: usize = (0..self.segments.len()).map(|s| self.part(s)).sum();
        let mut send = Vec::with_capacity(padded);
        for s in 0..self.segments.len() {
            send.extend_from_slice(&shard[self.in_shard(s)]);
            send.resize(send.len() + self.part(s) - self.in_shard(s).len(), 0.0);
        }
        let all = comm.gather_to_root(&send)?;
        let total = self.segments.last().map_or(0, |r| r.end);
        let mut full = vec![0f32; total];
        for (rank, sent) in all.chunks_exact(padded.max(1)).enumerate() {
            let mut at = 0;
            for s in 0..self.segments.len() {
                let r = self.range_of(s, rank);
                full[r.clone()].copy_from_slice(&sent[at..at + r.len()]);
                at += self.part(s);
            }
        }
        Some(full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Local;

    #[test]
    fn every_element_belongs_to_one_rank() {
        let segments = vec![0..5, 5..6, 6..17];
        for ranks in 1..5 {
            let mut owner = vec![0usize; 17];
            for rank in 0..ranks {
                let p = Partition::new(segments.clone(), rank, ranks);
                for r in p.mine() {
                    owner[r].iter_mut().for_each(|o| *o += 1);
                }
                let full: Vec<f32> = (0..17).map(|i| i as f32).collect();
                let shard = p.take(&full);
                assert_eq!(shard.len(), p.len());
                for s in 0..3 {
                    let want: Vec<f32> = p.range_of(s, rank).map(|i| i as f32).collect();
                    assert_eq!(shard[p.in_shard(s)], want[..]);
                }
            }
            assert!(owner.iter().all(|&o| o == 1), "{ranks} ranks: {owner:?}");
        }
    }

    #[test]
    fn one_rank_round_trips() {
        let p = Partition::new(vec![0..3, 3..7], 0, 1);
        let full = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];
        let shard = p.take(&full);
        assert_eq!(p.gather_to_root(&Local, &shard), Some(full.clone()));
        assert_eq!(p.all_gather(&Local, 1, &shard[p.in_shard(1)]), full[3..7]);
        let mut acc = vec![1.0; 4];
        p.reduce_scatter_add(&Local, 1, &full[3..7], &mut acc);
        assert_eq!(acc, vec![5.0, 6.0, 7.0, 8.0]);
    }
}
