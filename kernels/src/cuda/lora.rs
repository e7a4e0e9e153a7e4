//! placeholder
use super::{Cuda, CudaView, CudaViewMut};
use crate::backend::{LoraDropout, LoraShape, Result};
use crate::KernelError;
fn todo(op: &str) -> KernelError { KernelError::Unavailable(format!("{op}: not yet on CUDA")) }
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(_: &Cuda, _: CudaViewMut<'_>, _: CudaViewMut<'_>, _: CudaViewMut<'_>, _: CudaView<'_>, _: CudaView<'_>, _: CudaView<'_>, _: CudaView<'_>, _: Option<LoraDropout<'_>>, _: LoraShape, _: bool) -> Result<()> { Err(todo("lora_linear_forward")) }
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(_: &Cuda, _: CudaViewMut<'_>, _: Option<CudaViewMut<'_>>, _: Option<CudaViewMut<'_>>, _: CudaViewMut<'_>, _: CudaViewMut<'_>, _: CudaView<'_>, _: CudaView<'_>, _: CudaView<'_>, _: CudaView<'_>, _: CudaView<'_>, _: CudaView<'_>, _: Option<LoraDropout<'_>>, _: LoraShape) -> Result<()> { Err(todo("lora_linear_backward")) }
