//! placeholder
use super::{Cuda, CudaView, CudaViewMut};
use crate::backend::Result;
use crate::KernelError;
fn todo(op: &str) -> KernelError { KernelError::Unavailable(format!("{op}: not yet on CUDA")) }
#[allow(clippy::too_many_arguments)]
pub(super) fn apply(_: &Cuda, _: CudaViewMut<'_>, _: CudaView<'_>, _: CudaView<'_>, _: &[u32], _: usize, _: usize, _backward: bool) -> Result<()> { Err(todo("rope")) }
