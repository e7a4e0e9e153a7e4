//! Buffers and views: a `Buf` is a `Vec<f32>`, views are slices of it.
//! Copies are plain memcpy/memset: memory-bound, so threads would not help.

use super::check::expect_len;
use super::par::CHUNK;
use crate::backend::Result;
use rayon::prelude::*;

/// dst[i] = src[i].
pub fn copy(dst: &mut [f32], src: &[f32]) -> Result<()> {
    expect_len("copy", "src", src.len(), dst.len())?;
    dst.copy_from_slice(src);
    Ok(())
}

/// dst[i] = host[i].
pub fn write(dst: &mut [f32], host: &[f32]) -> Result<()> {
    expect_len("write", "host", host.len(), dst.len())?;
    dst.copy_from_slice(host);
    Ok(())
}

/// dst[i] = value.
pub fn fill(dst: &mut [f32], value: f32) -> Result<()> {
    // Zeroing the gradient buffer of a large model is memory-bound: use every core.
    dst.par_chunks_mut(CHUNK).for_each(|c| c.fill(value));
    Ok(())
}

/// References: the same ops as plain loops.
pub mod naive {
    pub fn copy(dst: &mut [f64], src: &[f64]) {
        assert_eq!(dst.len(), src.len());
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s;
        }
    }

    pub fn fill(dst: &mut [f64], value: f64) {
        for d in dst.iter_mut() {
            *d = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, rng, to64, uniform};
    use crate::{Backend, Cpu, KernelError};

    #[test]
    fn copy_write_fill_match_naive() {
        let mut r = rng(1);
        for n in [0, 1, 7, 1000] {
            let src = uniform(&mut r, n);
            let mut dst = vec![0.0f32; n];
            copy(&mut dst, &src).unwrap();
            let mut want = vec![0.0f64; n];
            naive::copy(&mut want, &to64(&src));
            assert_close("copy", &dst, &want, 0.0);

            write(&mut dst, &src).unwrap();
            assert_close("write", &dst, &want, 0.0);

            fill(&mut dst, 2.5).unwrap();
            naive::fill(&mut want, 2.5);
            assert_close("fill", &dst, &want, 0.0);
        }
    }

    #[test]
    fn buffers_and_views() {
        let cpu = Cpu;
        let mut buf = cpu
            .upload(&[1.0, 2.0, 3.0, 4.0], crate::Precision::F32)
            .unwrap();
        assert_eq!(cpu.len(&buf), 4);
        assert_eq!(cpu.download(cpu.view(&buf, 1..3)).unwrap(), vec![2.0, 3.0]);
        cpu.fill(cpu.view_mut(&mut buf, 0..2), 9.0).unwrap();
        assert_eq!(buf, vec![9.0, 9.0, 3.0, 4.0]);
        let z = cpu.zeros(3, crate::Precision::Compute).unwrap();
        assert_eq!(z, vec![0.0; 3]);
    }

    #[test]
    fn length_mismatch_is_an_error() {
        let mut dst = vec![0.0f32; 3];
        assert!(matches!(
            copy(&mut dst, &[1.0; 4]),
            Err(KernelError::Shape { op: "copy", .. })
        ));
        assert!(matches!(
            write(&mut dst, &[1.0; 2]),
            Err(KernelError::Shape { op: "write", .. })
        ));
    }
}
