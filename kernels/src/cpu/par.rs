//! How the CPU backend splits work across the rayon pool.
//!
//! Every parallel loop hands each task a disjoint, fixed-size chunk of the
//! output, and no float reduction is ever split across tasks in a
//! schedule-dependent order, so results are bitwise identical for any thread count.

/// Elements per task for elementwise ops: big enough that rayon's per-task
/// overhead (~µs) is negligible, small enough to balance a few cores.
pub(crate) const CHUNK: usize = 1 << 15;

/// Rows per task for row ops on rows of `c` elements: about `CHUNK` elements.
pub(crate) fn rows_per_task(c: usize) -> usize {
    (CHUNK / c.max(1)).max(1)
}

/// A raw pointer that may be shared between rayon tasks which write provably
/// disjoint parts of the buffer it points into (used where the disjoint parts are
/// strided, so `par_chunks_mut` cannot express the split).
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(*mut f32);

// SAFETY: the pointer itself is just an address; every user documents why the
// elements each task touches are disjoint from every other task's.
unsafe impl Send for SyncPtr {}
// SAFETY: as for Send: sharing the address is harmless, the writes are what
// each user must prove disjoint.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    pub(crate) fn from_raw(ptr: *mut f32) -> Self {
        SyncPtr(ptr)
    }

    pub(crate) fn new(slice: &mut [f32]) -> Self {
        SyncPtr(slice.as_mut_ptr())
    }

    /// The pointer. A method (not field access) so that closures capture the
    /// whole `SyncPtr`, which is `Sync`, rather than the bare `*mut f32` field.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
