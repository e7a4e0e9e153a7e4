//! The collective of CUDA workers: NCCL's all-reduce on the gradient buffer
//! in GPU memory (no host copy). The unique id comes from rank 0 through the
//! coordinator's rendezvous. A failed or stalled NCCL call surfaces as a
//! retryable [`CollectiveError::PeerLost`], so the coordinator re-places the
//! stage as it does for the CPU ring.

use super::{Collective, CollectiveError};
use anyhow::Result;
use rlhf_kernels::cuda::nccl::NcclComm;
use rlhf_kernels::cuda::Cuda;
use rlhf_kernels::Backend;
use std::ops::Range;

pub struct NcclAllReduce(pub NcclComm);

impl Collective<Cuda> for NcclAllReduce {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_reduce_sum(
        &mut self,
        be: &Cuda,
        buf: &mut <Cuda as Backend>::Buf,
        range: Range<usize>,
    ) -> Result<()> {
        self.0.all_reduce_sum(be.view_mut(buf, range)).map_err(|e| {
            CollectiveError::PeerLost {
                peer: "nccl".into(),
                detail: e.to_string(),
            }
            .into()
        })
    }
}
