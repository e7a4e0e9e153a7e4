//! placeholder
use super::{Cuda, CudaView, CudaViewMut};
use crate::backend::{AttnShape, Result};
use crate::KernelError;
fn todo(op: &str) -> KernelError { KernelError::Unavailable(format!("{op}: not yet on CUDA")) }
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(_: &Cuda, _: CudaViewMut<'_>, _: CudaViewMut<'_>, _: CudaView<'_>, _: CudaView<'_>, _: CudaView<'_>, _: Option<&[u8]>, _: AttnShape) -> Result<()> { Err(todo("attention_forward")) }
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(_: &Cuda, _: CudaViewMut<'_>, _: CudaViewMut<'_>, _: CudaViewMut<'_>, _: CudaView<'_>, _: CudaView<'_>, _: CudaView<'_>, _: CudaView<'_>, _: CudaView<'_>, _: CudaView<'_>, _: Option<&[u8]>, _: AttnShape) -> Result<()> { Err(todo("attention_backward")) }
