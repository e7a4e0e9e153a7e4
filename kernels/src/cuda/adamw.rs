//! placeholder
use super::{Cuda, CudaView, CudaViewMut};
use crate::backend::{AdamW, Result};
use crate::KernelError;
fn todo(op: &str) -> KernelError { KernelError::Unavailable(format!("{op}: not yet on CUDA")) }
pub(super) fn adamw(_: &Cuda, _: CudaViewMut<'_>, _: CudaView<'_>, _: CudaViewMut<'_>, _: CudaViewMut<'_>, _: AdamW) -> Result<()> { Err(todo("adamw")) }
