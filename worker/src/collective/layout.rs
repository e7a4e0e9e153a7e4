//! Where the ring cuts a buffer, and the byte conversions of a chunk.
//!
//! Every rank derives the same segments and chunks from (length, world size,
//! chunk size) alone, so the chunks need no negotiation and the addition order
//! of every element is fixed by the world size.

use prost::bytes::Bytes;
use std::ops::Range;
use std::sync::{Arc, Mutex};

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

/// The bytes of `xs` as they go on the wire (little-endian f32), without a
/// copy on little-endian targets.
#[cfg(target_endian = "little")]
fn le_view(xs: &[f32]) -> &[u8] {
    // SAFETY: an f32 is 4 bytes with no padding and every byte is a valid
    // u8; u8 needs alignment 1; the new slice covers exactly the memory of
    // `xs` (size_of_val bytes, which fits in isize because `xs` exists) and
    // borrows `xs` immutably for its whole lifetime, so nothing can write
    // through another reference meanwhile. On a little-endian target these
    // bytes are the f32s' little-endian encodings.
    unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), std::mem::size_of_val(xs)) }
}

/// The wire bytes of `xs` without a copy, where the memory is them (little-endian targets).
pub fn as_le_bytes(xs: &[f32]) -> Option<&[u8]> {
    #[cfg(target_endian = "little")]
    return Some(le_view(xs));
    #[cfg(not(target_endian = "little"))]
    return None;
}

/// Append the little-endian bytes of `xs` to `out`.
fn put_le(out: &mut Vec<u8>, xs: &[f32]) {
    #[cfg(target_endian = "little")]
    out.extend_from_slice(le_view(xs));
    #[cfg(not(target_endian = "little"))]
    for x in xs {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Little-endian bytes of `xs`.
pub fn to_le_bytes(xs: &[f32]) -> Bytes {
    let mut out = Vec::with_capacity(xs.len() * 4);
    put_le(&mut out, xs);
    Bytes::from(out)
}

/// `local[i] += f32 at bytes[4i..]`, in place (a loop the compiler vectorises:
/// unaligned little-endian loads, one add per element).
pub fn add_le(local: &mut [f32], bytes: &[u8]) {
    for (l, b) in local.iter_mut().zip(bytes.chunks_exact(4)) {
        *l += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// `local[i] += f32 at bytes[4i..]`; returns the sums as little-endian bytes
/// (what the rank forwards). `bytes.len()` must be `4 * local.len()` (checked
/// by the caller against the chunk header).
pub fn add_from_le(local: &mut [f32], bytes: &[u8]) -> Bytes {
    add_le(local, bytes);
    to_le_bytes(local)
}

/// `wire[i] ← local[i] + wire[i]` on little-endian f32 bytes, in place (the sum
/// a rank forwards, with the bits of `local[i] += wire[i]`); `local` gets the
/// sums too when `keep` (the last reduce-scatter step: the rank's final
/// segment). `wire.len()` must be `4 * local.len()`.
pub fn add_into_le(local: &mut [f32], wire: &mut [u8], keep: bool) {
    if keep {
        for (l, b) in local.iter_mut().zip(wire.chunks_exact_mut(4)) {
            let s = *l + f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            *l = s;
            b.copy_from_slice(&s.to_le_bytes());
        }
    } else {
        for (l, b) in local.iter().zip(wire.chunks_exact_mut(4)) {
            let s = *l + f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            b.copy_from_slice(&s.to_le_bytes());
        }
    }
}

/// `local[i] = f32 at bytes[4i..]`.
pub fn copy_from_le(local: &mut [f32], bytes: &[u8]) {
    for (l, b) in local.iter_mut().zip(bytes.chunks_exact(4)) {
        *l = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Payload buffers that come back when the transport drops the chunk (sent,
/// or consumed after receiving), so a ring does not ask the allocator for a
/// fresh chunk-sized buffer (and the kernel for fresh zeroed pages) for every
/// chunk it sends or receives. Without it the
/// allocator hands chunk-sized blocks back to the kernel and faults them in
/// again: measured ~30 % of the all-reduce time on loopback.
#[derive(Clone, Default)]
pub struct BufPool(Arc<Mutex<Vec<Vec<u8>>>>);

/// Most bytes a pool keeps for reuse (chunks beyond this are freed).
const POOL_BYTES: usize = 64 << 20;

/// A buffer that goes back to its pool when dropped.
pub struct Pooled {
    buf: Vec<u8>,
    pool: BufPool,
}

impl Pooled {
    pub fn vec(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// As `Bytes` (no copy); the buffer still goes back to the pool.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut free = self.pool.0.lock().unwrap_or_else(|p| p.into_inner());
        let kept: usize = free.iter().map(Vec::capacity).sum();
        if kept + buf.capacity() <= POOL_BYTES {
            free.push(buf);
        }
    }
}

impl BufPool {
    /// An empty buffer with room for `len` bytes, reused if the pool has one.
    pub fn take(&self, len: usize) -> Pooled {
        let mut buf = {
            let mut free = self.0.lock().unwrap_or_else(|p| p.into_inner());
            match free.iter().position(|b| b.capacity() >= len) {
                Some(i) => free.swap_remove(i),
                None => Vec::with_capacity(len),
            }
        };
        buf.clear();
        Pooled {
            buf,
            pool: self.clone(),
        }
    }

    /// The little-endian bytes of `xs` in a pooled buffer.
    pub fn le_bytes(&self, xs: &[f32]) -> Bytes {
        let mut buf = self.take(xs.len() * 4);
        put_le(buf.vec(), xs);
        buf.into_bytes()
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
        // The in-place sum has the bits of `local += wire`, kept or not.
        let mut wire = to_le_bytes(&xs).to_vec();
        let mut l2 = [1.0f32, 1.0, 1.0];
        add_into_le(&mut l2, &mut wire, false);
        assert_eq!(l2, [1.0; 3]);
        assert_eq!(wire, &sums[..]);
        let mut wire = to_le_bytes(&xs).to_vec();
        add_into_le(&mut l2, &mut wire, true);
        assert_eq!(l2, local);
        assert_eq!(wire, &sums[..]);
        assert_eq!(&b[..4], &1.5f32.to_bits().to_le_bytes());
    }

    #[test]
    fn pooled_buffers_come_back() {
        let pool = BufPool::default();
        let xs: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let a = pool.le_bytes(&xs);
        assert_eq!(a, to_le_bytes(&xs));
        let ptr = a.as_ptr();
        drop(a);
        // The same buffer is reused, and holds the new contents.
        let b = pool.le_bytes(&xs[..10]);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b, to_le_bytes(&xs[..10]));
        let c = pool.le_bytes(&xs);
        assert_ne!(c.as_ptr(), ptr);
        assert_eq!(c, to_le_bytes(&xs));
    }
}
