//! placeholder
use super::{Cuda, CudaView, CudaViewMut};
use crate::backend::Result;
use crate::KernelError;
fn todo(op: &str) -> KernelError { KernelError::Unavailable(format!("{op}: not yet on CUDA")) }
pub(super) fn forward(_: &Cuda, _: CudaViewMut<'_>, _: CudaViewMut<'_>, _: CudaView<'_>, _: CudaView<'_>, _: usize, _: f32) -> Result<()> { Err(todo("rmsnorm_forward")) }
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(_: &Cuda, _: CudaViewMut<'_>, _: Option<CudaViewMut<'_>>, _: CudaView<'_>, _: CudaView<'_>, _: CudaView<'_>, _: CudaView<'_>, _: usize) -> Result<()> { Err(todo("rmsnorm_backward")) }
