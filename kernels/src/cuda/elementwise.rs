//! placeholder
use super::{Cuda, CudaView, CudaViewMut};
use crate::backend::Result;
use crate::KernelError;
fn todo(op: &str) -> KernelError { KernelError::Unavailable(format!("{op}: not yet on CUDA")) }
pub(super) fn axpy(_: &Cuda, _: CudaViewMut<'_>, _: f32, _: CudaView<'_>) -> Result<()> { Err(todo("axpy")) }
pub(super) fn scale(_: &Cuda, _: CudaViewMut<'_>, _: f32) -> Result<()> { Err(todo("scale")) }
pub(super) fn sum_squares(_: &Cuda, _: CudaView<'_>) -> Result<f64> { Err(todo("sum_squares")) }
