//! Shape validation shared by every op. Bad shapes are caller bugs, but they are
//! reported as `KernelError::Shape` rather than panicking (see `KernelError`), and
//! every op validates all of its inputs before it writes anything.

use crate::backend::Result;
use crate::KernelError;

pub(crate) fn shape_err(op: &'static str, msg: impl Into<String>) -> KernelError {
    KernelError::Shape {
        op,
        msg: msg.into(),
    }
}

/// `got == want`, else a Shape error naming the argument.
pub(crate) fn expect_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(shape_err(
            op,
            format!("{what} has length {got}, expected {want}"),
        ))
    }
}

/// Number of rows of a row-major `[rows, c]` buffer of `len` elements.
/// `c` must be positive and divide `len`.
#[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
pub(crate) fn rows_of(op: &'static str, what: &str, len: usize, c: usize) -> Result<usize> {
    if c == 0 {
        return Err(shape_err(op, format!("{what}: row width must be positive")));
    }
    if len % c != 0 {
        return Err(shape_err(
            op,
            format!("{what} has length {len}, not a multiple of the row width {c}"),
        ));
    }
    Ok(len / c)
}

/// Product of dimensions, as a Shape error instead of an overflow.
pub(crate) fn product(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| shape_err(op, format!("dimensions {dims:?} overflow usize")))
}
