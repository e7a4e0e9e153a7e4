//! Token embedding lookup and its scatter-add gradient.

use super::check::{expect_len, rows_of};
use super::par::rows_per_task;
use crate::backend::Result;
use crate::KernelError;
use rayon::prelude::*;

/// Every id must address a row of a table with `rows` rows.
fn check_ids(op: &'static str, ids: &[u32], rows: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= rows) {
        Some(&id) => Err(KernelError::IndexOutOfRange {
            op,
            id: id as u64,
            rows,
        }),
        None => Ok(()),
    }
}

/// out[N,C] = table[ids[n], :]; table: [V,C].
pub fn forward(out: &mut [f32], table: &[f32], ids: &[u32], c: usize) -> Result<()> {
    const OP: &str = "embedding_forward";
    let v = rows_of(OP, "table", table.len(), c)?;
    let n = rows_of(OP, "out", out.len(), c)?;
    expect_len(OP, "ids", ids.len(), n)?;
    check_ids(OP, ids, v)?;
    let per_task = rows_per_task(c);
    out.par_chunks_mut(per_task * c)
        .zip(ids.par_chunks(per_task))
        .for_each(|(out, ids)| {
            for (row, &id) in out.chunks_exact_mut(c).zip(ids) {
                let id = id as usize;
                row.copy_from_slice(&table[id * c..(id + 1) * c]);
            }
        });
    Ok(())
}

/// dtable[ids[n], :] += dout[n, :]; dtable: [V,C], dout: [N,C].
///
/// Serial over rows: repeated ids add into the same table row, and a serial
/// scatter is race-free and deterministic. It is memory-bound at N·C adds,
/// negligible next to the GEMMs around it.
pub fn backward(dtable: &mut [f32], dout: &[f32], ids: &[u32], c: usize) -> Result<()> {
    const OP: &str = "embedding_backward";
    let v = rows_of(OP, "dtable", dtable.len(), c)?;
    let n = rows_of(OP, "dout", dout.len(), c)?;
    expect_len(OP, "ids", ids.len(), n)?;
    check_ids(OP, ids, v)?;
    for (g, &id) in dout.chunks_exact(c).zip(ids) {
        let id = id as usize;
        for (d, &g) in dtable[id * c..(id + 1) * c].iter_mut().zip(g) {
            *d += g;
        }
    }
    Ok(())
}

/// References: plain loops in f64.
pub mod naive {
    /// out[N,C] = table[ids[n], :].
    pub fn forward(table: &[f64], ids: &[u32], c: usize) -> Vec<f64> {
        let mut out = vec![0.0; ids.len() * c];
        for (n, &id) in ids.iter().enumerate() {
            for j in 0..c {
                out[n * c + j] = table[id as usize * c + j];
            }
        }
        out
    }

    /// The gradient with respect to the table [V,C] (not accumulated).
    pub fn backward(v: usize, dout: &[f64], ids: &[u32], c: usize) -> Vec<f64> {
        let mut dt = vec![0.0; v * c];
        for (n, &id) in ids.iter().enumerate() {
            for j in 0..c {
                dt[id as usize * c + j] += dout[n * c + j];
            }
        }
        dt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, dot, fd_grad, plus, rng, to64, uniform};
    use rand::Rng;

    /// (V, N, C), with N > V so ids repeat.
    const SHAPES: [(usize, usize, usize); 4] = [(1, 1, 1), (5, 17, 3), (50, 300, 33), (7, 9, 1000)];

    #[test]
    fn forward_and_backward_match_naive() {
        let mut r = rng(30);
        for (v, n, c) in SHAPES {
            let table = uniform(&mut r, v * c);
            let ids: Vec<u32> = (0..n).map(|_| r.random_range(0..v as u32)).collect();
            let mut out = vec![0.0f32; n * c];
            forward(&mut out, &table, &ids, c).unwrap();
            assert_close(
                "embedding_forward",
                &out,
                &naive::forward(&to64(&table), &ids, c),
                0.0,
            );

            let dout = uniform(&mut r, n * c);
            let mut dt = uniform(&mut r, v * c);
            let want = plus(&dt, &naive::backward(v, &to64(&dout), &ids, c));
            backward(&mut dt, &dout, &ids, c).unwrap();
            assert_close("embedding_backward", &dt, &want, 1e-5);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut r = rng(31);
        let (v, c, ids) = (4, 3, [2u32, 0, 2, 3, 2]);
        let dout = uniform(&mut r, ids.len() * c);
        let fd = fd_grad(&to64(&uniform(&mut r, v * c)), |t| {
            dot(&to64(&dout), &naive::forward(t, &ids, c))
        });
        let mut dt = vec![0.0f32; v * c];
        backward(&mut dt, &dout, &ids, c).unwrap();
        assert_close("dtable vs fd", &dt, &fd, 1e-5);
    }

    #[test]
    fn out_of_range_id_is_an_error() {
        let table = vec![0.0f32; 6]; // [3,2]
        let mut out = vec![0.0f32; 4];
        let err = forward(&mut out, &table, &[1, 3], 2).unwrap_err();
        assert!(
            matches!(err, KernelError::IndexOutOfRange { id: 3, rows: 3, .. }),
            "{err}"
        );
        let mut dt = table.clone();
        assert!(matches!(
            backward(&mut dt, &out, &[7, 0], 2),
            Err(KernelError::IndexOutOfRange { id: 7, .. })
        ));
        assert!(matches!(
            forward(&mut out, &table, &[0], 2),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(
            forward(&mut out, &table[..5], &[0, 0], 2),
            Err(KernelError::Shape { .. })
        ));
    }
}
