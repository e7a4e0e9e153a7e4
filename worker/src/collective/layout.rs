//! Where the ring cuts a buffer, and the byte conversions of a chunk.
//!
//! Every rank derives the same segments and chunks from (length, world size,
//! chunk size) alone, so the chunks need no negotiation and the addition order
//! of every element is fixed by the world size.

use prost::bytes::Bytes;
use std::ops::Range;

/// Segment `k` of `len` elements split over `world` ranks: the first
/// `len % world` segments are one element longer.
pub fn segment(len: usize, world: usize, k: usize) -> Range<usize> {
    let (base, extra) = (len / world, len % world);
    let start = k * base + k.min(extra);
    start..start + base + usize::from(k < extra)
}

/// The chunks of a range, each at most `chunk` elements (`chunk` ≥ 1).
pub fn chunks(range: Range<usize>, chunk: usize) -> impl Iterator<Item = Range<usize>> {
    let chunk = chunk.max(1);
    range
        .clone()
        .step_by(chunk)
        .map(move |s| s..(s + chunk).min(range.end))
}

/// The segment rank `rank` receives in ring step `step` (0 ≤ step < 2·(world−1)):
/// reduce-scatter steps walk backwards from the left neighbour's segment; the
/// all-gather steps then repeat the walk with final values.
pub fn recv_segment(rank: usize, world: usize, step: usize) -> usize {
    (rank + 2 * world - 1 - step % world) % world
}

/// Little-endian bytes of `xs`.
pub fn to_le_bytes(xs: &[f32]) -> Bytes {
    let mut out = vec![0u8; xs.len() * 4];
    for (o, x) in out.chunks_exact_mut(4).zip(xs) {
        o.copy_from_slice(&x.to_le_bytes());
    }
    Bytes::from(out)
}

/// `local[i] += f32 at bytes[4i..]`; returns the sums as little-endian bytes
/// (what the rank forwards). `bytes.len()` must be `4 * local.len()` (checked
/// by the caller against the chunk header).
pub fn add_from_le(local: &mut [f32], bytes: &[u8]) -> Bytes {
    let mut out = vec![0u8; bytes.len()];
    for ((l, b), o) in local
        .iter_mut()
        .zip(bytes.chunks_exact(4))
        .zip(out.chunks_exact_mut(4))
    {
        let v = *l + f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        *l = v;
        o.copy_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

/// `local[i] = f32 at bytes[4i..]`.
pub fn copy_from_le(local: &mut [f32], bytes: &[u8]) {
    for (l, b) in local.iter_mut().zip(bytes.chunks_exact(4)) {
        *l = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_tile_the_buffer() {
        for len in [0, 1, 2, 3, 7, 10, 11, 1000] {
            for world in 1..6 {
                let mut next = 0;
                for k in 0..world {
                    let s = segment(len, world, k);
                    assert_eq!(s.start, next);
                    assert!(s.len() == len / world || s.len() == len / world + 1);
                    let cs: Vec<_> = chunks(s.clone(), 3).collect();
                    assert_eq!(cs.iter().map(|c| c.len()).sum::<usize>(), s.len());
                    assert!(cs.iter().all(|c| !c.is_empty() && c.len() <= 3));
                    next = s.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn each_rank_receives_every_other_segment_twice() {
        for world in 2..6 {
            for rank in 0..world {
                let steps = 2 * (world - 1);
                let segs: Vec<_> = (0..steps).map(|s| recv_segment(rank, world, s)).collect();
                // Reduce-scatter ends on the segment this rank owns: rank + 1.
                assert_eq!(segs[world - 2], (rank + 1) % world);
                // The left neighbour sends at step s what it received at s − 1.
                let left = (rank + world - 1) % world;
                for (s, &seg) in segs.iter().enumerate().skip(1) {
                    assert_eq!(seg, recv_segment(left, world, s - 1));
                }
                assert_eq!(segs[0], left);
            }
        }
    }

    #[test]
    fn conversions_round_trip() {
        let xs = [1.5f32, -2.0, 3.25e-3];
        let b = to_le_bytes(&xs);
        let mut local = [1.0f32, 1.0, 1.0];
        let sums = add_from_le(&mut local, &b);
        assert_eq!(local, [2.5, -1.0, 1.0 + 3.25e-3]);
        let mut back = [0f32; 3];
        copy_from_le(&mut back, &sums);
        assert_eq!(back, local);
    }
}
