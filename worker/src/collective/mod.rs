//! Collectives between the data-parallel ranks of a stage.
//!
//! The trainer sees only [`Collective`]: an element-wise sum over ranks that
//! leaves the same bits on every rank. [`Single`] is the one-process case;
//! [`ring::RingAllReduce`] streams chunks around a ring of workers over plain
//! TCP or TLS connections (CPU workers); the CUDA backend implements the same trait with NCCL on
//! device buffers, which is why the trait takes the backend's buffers.

pub mod error;
pub mod layout;
pub mod nccl;
pub mod ring;
pub mod server;
mod wire;

pub use error::CollectiveError;
pub use ring::{RingAllReduce, RingConfig};
pub use server::{CollectiveServer, ServerConfig};

use anyhow::Result;
use rlhf_kernels::Backend;
use std::ops::Range;

/// Sum across the ranks of a stage.
pub trait Collective<B: Backend>: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// `buf[range]` ← Σ over ranks of `buf[range]`. Every rank must call with
    /// the same length; on return every rank holds bitwise the same values, and
    /// the order of additions is fixed by the world size alone (so a run is
    /// reproducible). Fails — never hangs — when a peer dies or the stage is
    /// aborted.
    fn all_reduce_sum(&mut self, be: &B, buf: &mut B::Buf, range: Range<usize>) -> Result<()>;
    /// The stage is over on this rank: flush what neighbours still need.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// One process: the sum over ranks is the buffer itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl<B: Backend> Collective<B> for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _be: &B, _buf: &mut B::Buf, _range: Range<usize>) -> Result<()> {
        Ok(())
    }
}

/// Host-memory all-reduce, for backends whose buffers the network code reads
/// through a download/upload. The ring implements this; a blanket adapter
/// turns it into a [`Collective`] for any backend.
pub trait HostAllReduce: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn all_reduce_sum_host(&mut self, data: &mut [f32]) -> Result<()>;
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Any host all-reduce, used on any backend: download, reduce, write back.
pub struct ViaHost<H>(pub H);

impl<B: Backend, H: HostAllReduce> Collective<B> for ViaHost<H> {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_reduce_sum(&mut self, be: &B, buf: &mut B::Buf, range: Range<usize>) -> Result<()> {
        if self.0.world_size() == 1 {
            return Ok(());
        }
        let mut host = be.download(be.view(buf, range.clone()))?;
        self.0.all_reduce_sum_host(&mut host)?;
        be.write(be.view_mut(buf, range), &host)?;
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        self.0.finish()
    }
}
